"""Training from original release files gives what training from the converted folder gives: for each family whose
release the Wan loader or the family's own converter reads, ``load_training_components(release)`` returns the same
trained expert (class and weights), the same frozen encoders and the same pipeline class as the converted folder.
The converted folders' training runs (loss, LoRA load, full fine-tuning) are tested per family elsewhere
(test_training_families_extra, test_training_dancer, test_animate2_lora, test_training_mova), so this equality makes
those runs hold for the release route too.  (Wan2.1 T2V, S2V, LongCat-Video and MOVA releases: test_training,
test_training_families_extra and test_training_release_routes.)"""

from __future__ import annotations

import pytest
import torch

from diffusers_wan_ext.demo import make_tiny_release
from diffusers_wan_ext.release_converter import convert_release
from diffusers_wan_ext.training.components import load_training_components

#: (tiny architecture, experts, trained expert)
CASES = [
    ("animate", 1, "transformer"),     # Wan2.2-Animate-14B (adapter weights in the DiT file)
    ("animate2", 1, "transformer"),    # Wan2.2-Animate-2-14B (the family's own converter)
    ("dancer", 1, "transformer"),      # Wan-Dancer-14B (the family's own converter)
    ("vace", 1, "transformer"),        # VACE (1.3B-Preview / 1.3B / 14B layout)
    ("t2v", 2, "transformer_2"),       # Wan2.2 A14B: the low-noise expert of a two-expert release
]
COMPARED = ("transformer", "text_encoder", "vae", "image_encoder", "audio_encoder")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch,experts,expert", CASES, ids=[c[0] + ("-2" if c[1] == 2 else "") for c in CASES])
def test_release_files_give_the_converted_folders_components(arch, experts, expert, tmp_path):
    release = make_tiny_release(tmp_path / "release", arch=arch, experts=experts)
    converted = convert_release(release, tmp_path / "converted", dtype="fp32", image_encoder_heads=2, progress=False)
    from_release = load_training_components(release, expert=expert, dtype=torch.float32, image_encoder_heads=2)
    from_folder = load_training_components(converted, expert=expert, dtype=torch.float32)
    assert from_release.pipeline_class == from_folder.pipeline_class
    assert from_release.expert == from_folder.expert == expert
    assert from_release.boundary_ratio == from_folder.boundary_ratio
    for name in COMPARED:
        a, b = getattr(from_release, name), getattr(from_folder, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert type(a) is type(b), (name, type(a).__name__, type(b).__name__)
            assert _same_weights(a, b), name
    assert from_release.transformer is not None and from_release.text_encoder is not None
    assert sorted(from_release.extra_components) == sorted(from_folder.extra_components)
