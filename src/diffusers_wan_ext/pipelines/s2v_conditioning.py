"""Conditioning of Wan2.2-S2V: audio loading, Wav2Vec2 features per clip, pose video and motion history.

The audio path is the original's (``wan/modules/s2v/audio_encoder.py``, identical in DiffSynth-Studio's
``WanS2VAudioEncoder``), step by step:

1. mono audio at the feature extractor's rate (16 kHz) -> ``processor(...).input_values`` (zero-mean / unit-variance);
2. all hidden states of the Wav2Vec2 model (embeddings + every layer: 25 for wav2vec2-large), 50 per second, stacked
   ``[layers, T, C]`` and linearly resampled (``align_corners=True``) to ``int(T / 50 * 30)`` frames: 30 per second
   (:func:`wav2vec_features`);
3. "bucketing" to the video frame rate (:func:`bucket_audio_features`): one feature frame per video frame at
   ``fps`` (16), picked at ``round(k / fps * 30)``; the audio is cut into clips of ``frames_per_clip`` video frames and
   the last clip padded with zero features.  The clip count is the original's ``int(T30 / (frames_per_clip * 30 /
   fps)) + 1`` -- note that audio of exactly ``n`` clips gets ``n + 1`` clips, the last one silent (kept as in the
   original; pass ``num_clips`` to the pipeline to cap it);
4. per clip ``[1, layers, C, frames_per_clip]`` -- the transformer's ``audio_embeds``.

Pose videos are read at ``fps`` (a file at another rate is subsampled every ``round(file_fps / fps)`` frames, as the
original), resized to cover ``height x width`` and centre-cropped (DiffSynth's ``VideoData``), padded with black
frames to the generated length and split per clip; each clip's pose latents are the VAE latents of
``[first frame, clip frames]`` without the first latent frame (:func:`pose_latents_per_clip`).

The motion history is the last ``motion_frames`` (73) video frames, zero-padded in front when shorter
(:func:`motion_history`); its VAE latents (19 latent frames) feed the transformer's FramePack tokens.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..utils.media import encode_video, read_audio_file, read_video_file, video_to_tensor

__all__ = [
    "AUDIO_FEATURE_FPS",
    "WAV2VEC_FPS",
    "audio_embeds_per_clip",
    "bucket_audio_features",
    "load_audio",
    "load_pose_video",
    "motion_history",
    "pose_latents_per_clip",
    "wav2vec_features",
]

#: Hidden-state rate of Wav2Vec2 at 16 kHz (conv feature stride 320).
WAV2VEC_FPS = 50
#: Rate the original resamples the Wav2Vec2 features to (``AudioEncoder.video_rate``).
AUDIO_FEATURE_FPS = 30


# -------------------------------------------------------------------------------------------------------- audio


def load_audio(audio: Any, sample_rate: int = 16000, target_rate: int = 16000, name: str = "audio") -> np.ndarray:
    """Mono float32 audio at ``target_rate`` (the feature extractor's rate) from a file or an array.

    Args:
        audio: a path to an audio file (PCM ``.wav`` is read with the standard library; other formats, and WAVs at
            another rate, are decoded and resampled with ffmpeg -- the original resamples with librosa), or a 1-D
            array / tensor of samples (float in [-1, 1], or integer PCM).
        sample_rate: rate of an array (ignored for files, whose rate is read from the file).  It must equal
            ``target_rate``: arrays are not resampled silently.
        target_rate: the rate the audio encoder expects.

    Example:
        >>> load_audio(np.zeros(16000, np.float32), 16000).shape
        (16000,)
    """
    if isinstance(audio, (str, os.PathLike)):
        return read_audio_file(audio, target_rate, name)
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    if isinstance(audio, (list, tuple)):
        audio = np.asarray(audio)
    if not isinstance(audio, np.ndarray):
        raise ValueError(
            f"{name} must be a path to an audio file or a 1-D array of samples, got {type(audio).__name__}"
        )
    if audio.ndim != 1:
        raise ValueError(
            f"{name} must be mono, a 1-D array of samples; got shape {tuple(audio.shape)} (average the channels, "
            "e.g. audio.mean(axis=0) for [channels, samples])"
        )
    if audio.size == 0:
        raise ValueError(f"{name} is empty")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"audio_sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if sample_rate != target_rate:
        raise ValueError(
            f"audio_sample_rate={sample_rate}, but the audio encoder expects {target_rate} Hz: resample the array to "
            f"{target_rate} Hz (e.g. librosa.resample(audio, orig_sr={sample_rate}, target_sr={target_rate})) or pass "
            "the audio file's path (it is resampled on reading)"
        )
    if np.issubdtype(audio.dtype, np.integer):
        return (audio.astype(np.float32) / float(np.iinfo(audio.dtype).max + 1)).astype(np.float32)
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{name}: samples must be float (or integer PCM), got dtype {audio.dtype}")
    return audio.astype(np.float32)


@torch.no_grad()
def wav2vec_features(
    audio_encoder: torch.nn.Module,
    audio_processor: Any,
    audio: np.ndarray,
    sample_rate: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """All Wav2Vec2 hidden states at 30 per second: ``[layers, int(T / 50 * 30), C]`` (float32).

    ``audio_encoder`` is a transformers ``Wav2Vec2Model`` or ``Wav2Vec2ForCTC``; ``audio_processor`` its
    ``Wav2Vec2Processor`` or ``Wav2Vec2FeatureExtractor``.
    """
    values = audio_processor(audio, sampling_rate=sample_rate, return_tensors="pt").input_values
    device = device if device is not None else next(audio_encoder.parameters()).device
    dtype = next(audio_encoder.parameters()).dtype
    out = audio_encoder(values.to(device=device, dtype=dtype), output_hidden_states=True)
    feats = torch.cat(out.hidden_states).float()  # [layers, T, C]
    feats = feats.transpose(1, 2)
    out_len = int(feats.shape[2] / float(WAV2VEC_FPS) * AUDIO_FEATURE_FPS)
    feats = F.interpolate(feats, size=out_len, align_corners=True, mode="linear")
    return feats.transpose(1, 2)


def bucket_audio_features(
    features: torch.Tensor, fps: int = 16, frames_per_clip: int = 80, m: int = 0
) -> tuple[torch.Tensor, int]:
    """Audio features per video frame, cut into whole clips (the original ``get_audio_embed_bucket_fps``).

    Args:
        features: ``[layers, T, C]`` at :data:`AUDIO_FEATURE_FPS` (30) frames per second.
        fps: video frame rate (16).
        frames_per_clip: video frames per clip (80).
        m: neighbouring feature frames on each side (the original uses 0).

    Returns:
        ``([1, layers, (2m + 1) C, num_clips * frames_per_clip], num_clips)``; frames past the audio are zero.

    Example:
        >>> embeds, clips = bucket_audio_features(torch.randn(25, 151, 8), fps=16, frames_per_clip=80)
        >>> tuple(embeds.shape), clips
        ((1, 25, 8, 160), 2)
    """
    layers, t, c = features.shape
    rate = AUDIO_FEATURE_FPS
    scale = rate / fps
    num_clips = int(t / (frames_per_clip * scale)) + 1
    count = num_clips * frames_per_clip
    total = math.ceil(num_clips * frames_per_clip / fps * rate)  # audio frames incl. the zero padding
    # get_sample_indices(original_fps=30, total_frames=total, target_fps=fps, num_sample=count, fixed_start=0)
    times = np.linspace(0, count / fps, count, endpoint=False)
    idx = np.clip(np.round(times * rate).astype(int), 0, total - 1)
    stride = int(rate / fps)
    offsets = np.arange(-m * stride, (m + 1) * stride, stride)
    chosen = np.clip(idx[:, None] + offsets[None, :], 0, t - 1)  # [count, 2m + 1]
    picked = features[:, torch.from_numpy(chosen).to(features.device)]  # [layers, count, 2m + 1, C]
    picked = picked.flatten(2)  # [layers, count, (2m + 1) C]
    valid = torch.from_numpy(idx < t).to(features.device)
    picked = picked * valid[None, :, None].to(picked.dtype)
    return picked.permute(0, 2, 1).unsqueeze(0), num_clips


def audio_embeds_per_clip(
    audio_encoder: torch.nn.Module,
    audio_processor: Any,
    audio: np.ndarray,
    sample_rate: int,
    fps: int = 16,
    frames_per_clip: int = 80,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """The transformer's ``audio_embeds`` for every clip, ``[1, layers, C, frames_per_clip]`` each
    (DiffSynth's ``get_audio_feats_per_inference``)."""
    feats = wav2vec_features(audio_encoder, audio_processor, audio, sample_rate, device=device)
    embeds, num_clips = bucket_audio_features(feats, fps=fps, frames_per_clip=frames_per_clip)
    return [embeds[..., i * frames_per_clip:(i + 1) * frames_per_clip] for i in range(num_clips)]


# -------------------------------------------------------------------------------------------------- pose / motion


def _cover_crop(image: PIL.Image.Image, height: int, width: int) -> np.ndarray:
    """Resize to cover ``height x width`` (bilinear) and centre-crop, as DiffSynth's ``VideoData``."""
    image = image.convert("RGB")
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = round(w * scale), round(h * scale)
    image = image.resize((new_w, new_h), PIL.Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8)


def load_pose_video(
    video: Any, height: int, width: int, fps: int = 16, max_frames: int | None = None, name: str = "pose_video"
) -> torch.Tensor:
    """A pose video as ``[1, 3, N, height, width]`` float32 in [-1, 1].

    Files are read at ``fps`` (every ``round(file_fps / fps)``-th frame) and PIL frames resized to cover
    ``height x width`` and centre-cropped; numpy ``[N, H, W, 3]`` and torch ``[N, 3, H, W]`` / ``[1, 3, N, H, W]``
    videos must have that size already.  At most ``max_frames`` frames are kept.
    """
    if isinstance(video, (str, os.PathLike)):
        video = read_video_file(video, name, fps=fps, max_frames=max_frames)
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, PIL.Image.Image) for f in video):
        video = np.stack([_cover_crop(f, height, width) for f in video[:max_frames]])
    t = video_to_tensor(video, name)
    if t.shape[2] == 0:
        raise ValueError(f"{name} has no frames")
    if tuple(t.shape[3:]) != (height, width):
        raise ValueError(
            f"{name} frames are {t.shape[3]}x{t.shape[4]} (height x width) but the video is {height}x{width}: resize "
            "the frames, or pass PIL images / a file (those are resized and centre-cropped)"
        )
    return t[:, :, :max_frames] if max_frames is not None else t


def pose_latents_per_clip(vae, pose: torch.Tensor, num_clips: int, frames_per_clip: int) -> list[torch.Tensor]:
    """Pose latents ``[1, z, frames_per_clip / 4, h, w]`` per clip from a pose video ``[1, 3, N, H, W]``.

    The video is cut (or padded with black, -1) to ``num_clips * frames_per_clip`` frames and split per clip; each
    clip is encoded as ``[its first frame, its frames]`` and the first latent frame dropped (the original
    ``load_pose_cond``).
    """
    need = num_clips * frames_per_clip
    pose = pose[:, :, :need]
    if pose.shape[2] < need:
        pad = -torch.ones(*pose.shape[:2], need - pose.shape[2], *pose.shape[3:], dtype=pose.dtype, device=pose.device)
        pose = torch.cat([pose, pad], dim=2)
    out = []
    for clip in pose.chunk(num_clips, dim=2):
        clip = torch.cat([clip[:, :, :1], clip], dim=2)
        out.append(encode_video(vae, clip)[:, :, 1:])
    return out


def motion_history(frames: torch.Tensor | None, motion_frames: int, height: int, width: int) -> torch.Tensor:
    """The last ``motion_frames`` frames ``[1, 3, motion_frames, H, W]`` of ``frames`` (``[1, 3, N, H, W]`` in
    [-1, 1]), zero-padded in front when shorter; ``None`` gives all zeros (the original's empty history)."""
    history = torch.zeros(1, 3, motion_frames, height, width)
    if frames is None:
        return history
    frames = frames[:, :, -motion_frames:].to(history)
    history[:, :, motion_frames - frames.shape[2]:] = frames
    return history
