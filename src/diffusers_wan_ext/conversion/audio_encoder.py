"""The Wan2.2-S2V audio encoder: the release's ``wav2vec2-large-xlsr-53-english/`` folder -> transformers.

The release ships the folder in the Hugging Face layout of ``jonatasgrosman/wav2vec2-large-xlsr-53-english``: a
``Wav2Vec2ForCTC`` ``config.json``, ``model.safetensors`` (keys ``wav2vec2.*`` + ``lm_head.*``, the positional conv
under the pre-parametrization names ``weight_g`` / ``weight_v``, which transformers renames on load) and the
``Wav2Vec2Processor`` files (``preprocessor_config.json``, ``vocab.json``, tokenizer config).  No key map is needed:
the audio encoder becomes a ``Wav2Vec2Model`` (the CTC head is unused: S2V reads the hidden states of every layer,
as the original and DiffSynth-Studio do) and the processor is kept as it is.  Loading is strict: a missing or
mis-shaped weight, or an unexpected one other than the CTC head, is an error naming the keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..utils.io import ConversionError, raise_for_key_problems

__all__ = ["WAV2VEC_DIR", "load_audio_encoder_from_release", "load_audio_processor_from_release"]

#: Folder of the audio encoder in the Wan2.2-S2V-14B release.
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no audio encoder folder (the release's {WAV2VEC_DIR}/)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{folder}: no config.json (expected the Hugging Face layout of {WAV2VEC_DIR}/)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # non-UTF-8 too: name the file
        raise ConversionError(f"{cfg_path}: invalid JSON ({e})") from e
    if cfg.get("model_type") != "wav2vec2":
        raise ConversionError(f"{cfg_path}: model_type {cfg.get('model_type')!r}, expected 'wav2vec2'")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise ConversionError(f"{folder}: no weights ({' / '.join(_WEIGHT_FILES)})")


def load_audio_encoder_from_release(folder: str | os.PathLike, torch_dtype: torch.dtype = torch.float32):
    """``transformers.Wav2Vec2Model`` from the release's wav2vec2 folder (the CTC head is dropped).

    Example:
        >>> encoder = load_audio_encoder_from_release("Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english")  # doctest: +SKIP
    """
    from transformers import Wav2Vec2Model
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    _check_folder(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the CTC head is reported as unexpected; we check the keys ourselves
    try:
        model, info = Wav2Vec2Model.from_pretrained(str(folder), output_loading_info=True, dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConversionError(f"{folder}: cannot load the Wav2Vec2 weights ({e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith("lm_head.")]
    wrong = [str(k) for k in info.get("mismatched_keys", ())]
    raise_for_key_problems(f"{folder} (Wav2Vec2Model)", info.get("missing_keys", ()), unexpected, wrong)
    return model.eval()


def load_audio_processor_from_release(folder: str | os.PathLike):
    """The release's ``Wav2Vec2Processor`` (or only its ``Wav2Vec2FeatureExtractor`` when the folder has no
    tokenizer files); S2V uses the feature extractor (16 kHz, normalised input)."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    folder = Path(folder)
    _check_folder(folder)
    if not (folder / "preprocessor_config.json").is_file() and not (folder / "processor_config.json").is_file():
        raise ConversionError(f"{folder}: no preprocessor_config.json (the Wav2Vec2 feature extractor settings)")
    if (folder / "vocab.json").is_file():
        return Wav2Vec2Processor.from_pretrained(str(folder))
    return Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
