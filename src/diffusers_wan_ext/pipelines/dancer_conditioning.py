"""Conditioning of the Wan-Dancer pipeline: music features, keyframe times and the keyframe condition ``y``.

**Music features** (:func:`music_features`) follow DiffSynth-Studio's ``WanVideoUnit_WanToDance_ProcessInputs.
get_music_base_feature``: the music is read at ``30 * 512 = 15360`` Hz and analysed with librosa as if it were at
22050 Hz with a hop of 512 samples -- so one feature frame per 1/30 s, one per 30-fps video frame -- giving 35
features per frame: onset strength (1), MFCC (20), chroma CENS (12), onset-peak one-hot (1) and beat one-hot (1)
(``beat_track`` on the onset envelope with ``tightness=100``, started at the tempo ``librosa`` estimates from the
music at 22050 Hz).  The audio is read with the loader of the S2V pipeline (:func:`~diffusers_wan_ext.pipelines.
s2v_conditioning.load_audio`: PCM WAV through the standard library, other formats / rates resampled by ffmpeg)
instead of ``librosa.load`` (soxr resampling): at the file's own rate the samples are identical.  librosa is an
optional dependency (``pip install librosa``), needed only for this step; precomputed features can be passed
instead.

**Time axis.**  The global model's latent frame ``i`` is the keyframe at ``4 i / global_fps`` seconds (its temporal
RoPE puts it at 30-fps position ``4 i * 30 / global_fps``); the local model renders 30-fps segments whose frames at
those times are keyframes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .s2v_conditioning import load_audio

__all__ = ["FEATURE_FPS", "HOP_LENGTH", "keyframe_condition", "music_features", "slice_music"]

#: Feature frames per second of the music features (= the local model's frame rate).
FEATURE_FPS = 30
#: librosa hop length of the reference.
HOP_LENGTH = 512
#: The rate librosa is told (the reference passes 22050 while the samples are at 30 * 512 Hz).
LIBROSA_RATE = 22050


def _librosa():
    try:
        import librosa
    except ImportError:
        raise ValueError(
            "music: computing Wan-Dancer's music features needs librosa (pip install librosa, or the dancer extra), as DiffSynth-Studio "
            "does; or pass precomputed music_features [frames, 35] at 30 frames per second"
        ) from None
    return librosa


def _tempo(librosa, samples: np.ndarray) -> float:
    tempo = getattr(librosa.feature, "tempo", None) or librosa.beat.tempo  # moved in librosa 0.10
    return float(np.atleast_1d(tempo(y=samples))[0])


def music_features(music: Any, name: str = "music") -> torch.Tensor:
    """The reference's 35 music features per 1/30 s of ``music`` (a file path) -> float32 ``[frames, 35]``."""
    data = load_audio(music, target_rate=FEATURE_FPS * HOP_LENGTH, name=name)  # file errors first
    librosa = _librosa()
    sr = LIBROSA_RATE
    envelope = librosa.onset.onset_strength(y=data, sr=sr)
    mfcc = librosa.feature.mfcc(y=data, sr=sr, n_mfcc=20).T
    chroma = librosa.feature.chroma_cens(y=data, sr=sr, hop_length=HOP_LENGTH, n_chroma=12).T
    peaks = librosa.onset.onset_detect(onset_envelope=envelope.flatten(), sr=sr, hop_length=HOP_LENGTH)
    peak_onehot = np.zeros_like(envelope, dtype=np.float32)
    peak_onehot[peaks] = 1.0
    start_bpm = _tempo(librosa, load_audio(music, target_rate=LIBROSA_RATE, name=name))
    _, beats = librosa.beat.beat_track(onset_envelope=envelope, sr=sr, hop_length=HOP_LENGTH, start_bpm=start_bpm,
                                       tightness=100)
    beat_onehot = np.zeros_like(envelope, dtype=np.float32)
    beat_onehot[beats] = 1.0
    feats = np.concatenate([envelope[:, None], mfcc, chroma, peak_onehot[:, None], beat_onehot[:, None]], axis=-1)
    return torch.from_numpy(feats.astype(np.float32))


def slice_music(features: torch.Tensor, start_s: float, seconds: float) -> torch.Tensor:
    """The feature frames of ``[start_s, start_s + seconds)`` (30 per second), zero-padded past the end."""
    start, count = int(round(start_s * FEATURE_FPS)), max(1, int(round(seconds * FEATURE_FPS)))
    out = features[start : start + count]
    if out.shape[0] < count:
        out = torch.cat([out, out.new_zeros(count - out.shape[0], out.shape[1])])
    return out


def keyframe_condition(vae_latents: torch.Tensor, mask: torch.Tensor, temporal: int = 4) -> torch.Tensor:
    """The DiT's ``y`` ``[B, 4 + z, T, h, w]``: the 4-channel keyframe mask (pixel-frame ``mask`` ``[F]`` with the
    first frame repeated ``temporal`` times, folded into groups of ``temporal``) before the VAE latents of the
    keyframe video (non-keyframes black), as the reference's ``ImageKeyframesEmbedder``."""
    b, _, t, h, w = vae_latents.shape
    msk = mask.to(vae_latents).view(1, -1, 1, 1).expand(b, -1, h, w)
    msk = torch.cat([msk[:, :1].repeat(1, temporal, 1, 1), msk[:, 1:]], dim=1)
    msk = msk.view(b, t, temporal, h, w).transpose(1, 2)
    return torch.cat([msk, vae_latents], dim=1)
