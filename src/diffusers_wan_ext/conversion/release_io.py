"""Helpers shared by the release converters: storage dtypes, progress, model cards, class records."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple as fetch_class_library_tuple
from tqdm.auto import tqdm

__all__ = ["DTYPES", "first_existing", "library_of", "progress_bar", "progress_message", "write_model_card"]

#: ``--dtype`` names -> torch dtypes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_DEFAULT_CARD_CALL = (
    'prompt="a cat surfing a wave", height={height}, width={width},\n'
    "             num_frames={num_frames}, num_inference_steps={num_inference_steps},\n"
    "             guidance_scale={guidance_scale}"
)


def first_existing(*paths: Path | None) -> Path | None:
    """The first of ``paths`` that exists (``None`` entries are skipped), else ``None``."""
    return next((p for p in paths if p is not None and p.exists()), None)


def progress_bar(total: int, enabled: bool):
    """The converter's progress bar (one step per component)."""
    return tqdm(total=total, desc="converting", unit="component", disable=not enabled)


def progress_message(text: str, enabled: bool) -> None:
    """One line of the converter's progress output (stderr, kept clear of the bar); nothing when ``enabled`` is off."""
    if enabled:
        tqdm.write(text, file=sys.stderr)


def library_of(obj) -> list[str]:
    """``[library, class]`` of a component, as ``model_index.json`` records it.

    Transformers 5 without torchvision makes ``CLIPImageProcessor`` the PIL backend class ``CLIPImageProcessorPil``,
    a name Transformers 4 cannot load; the folder names ``CLIPImageProcessor`` as the Wan-AI releases do (each
    Transformers version then picks its backend)."""
    library, cls = fetch_class_library_tuple(obj)
    if library == "transformers" and cls.endswith("ImageProcessorPil"):
        cls = cls[: -len("Pil")]
    return [library, cls]


def write_model_card(folder: Path, variant, pipeline_class: str, source: str, call: str | None = None,
                     extra: str = "") -> None:
    """The converted folder's ``README.md``: where it comes from, how to load it, the release's sampling defaults.

    ``call`` is the example call's arguments (``str.format`` fields: the variant's sampling defaults; default: text to
    video); ``extra`` is appended after the example.
    """
    text_call = (call or _DEFAULT_CARD_CALL).format(
        height=variant.height, width=variant.width, num_frames=variant.num_frames,
        num_inference_steps=variant.num_inference_steps, guidance_scale=variant.guidance_scale,
    )
    imports = "from diffusers.utils import load_image, load_video\n" if call else ""
    low = f" / {variant.guidance_scale_2} (low-noise expert)" if variant.guidance_scale_2 else ""
    text = f"""---
library_name: diffusers
tags:
- video-generation
- wan
- diffusers_wan_ext
base_model: {variant.release}
---

# {variant.release} (Diffusers format)

Converted with [diffusers_wan_ext](https://pypi.org/project/diffusers_wan_ext) from `{source}`.
Variant `{variant.name}`; pipeline `{pipeline_class}`.

```python
import torch
from diffusers import DiffusionPipeline
{imports}
pipe = DiffusionPipeline.from_pretrained("<this repo>", dtype=torch.bfloat16, trust_remote_code=True)
video = pipe({text_call}).frames[0]
```
{extra}
Sampling defaults of the original release: flow shift {variant.flow_shift}, {variant.num_inference_steps} steps,
guidance {variant.guidance_scale}{low},
{variant.num_frames} frames{" per clip" if variant.audio_encoder else ""} at {variant.fps} fps.
"""
    (folder / "README.md").write_text(text)
