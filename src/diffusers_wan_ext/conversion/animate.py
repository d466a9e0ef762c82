"""Wan2.2-Animate-14B: the Animate adapter of the original release <-> stock Diffusers ``WanAnimateTransformer3DModel``.

The release ships one DiT file (``diffusion_pytorch_model-*.safetensors``) holding an I2V Wan DiT (converted by the
shared tables of :mod:`diffusers_wan_ext.conversion.dit`) *and* the Animate adapter:

* ``pose_patch_embedding`` -- Conv3d on the pose-video latents, added to latent frames ``1..``;
* ``motion_encoder`` -- the LIA motion encoder: ``enc.net_app.convs.0`` (1x1 conv + fused leaky ReLU),
  ``convs.1..n`` (StyleGAN-style down-sampling residual blocks with a ``[1, 3, 3, 1]`` blur FIR), ``convs.n+1``
  (4x4 conv to the style vector), ``enc.fc.*`` (five EqualLinears) and ``dec.direction`` (the QR motion basis);
* ``face_encoder`` -- causal Conv1d stack turning motion vectors into 4 face tokens (+ a padding token) per
  latent frame;
* ``face_adapter.fuser_blocks.N`` -- per-latent-frame cross-attention to the face tokens after DiT block ``5 N``.

:data:`ANIMATE_KEY_RULES` (fixed modules) and :data:`RES_BLOCK_RULES` (one motion-encoder residual block, repeated
by :func:`animate_key_rules` for the number of blocks the weights have) are that layout as a table of
:class:`~diffusers_wan_ext.conversion.text_encoder.KeyRule` rows, run by the shared table engine
(:func:`~diffusers_wan_ext.conversion.text_encoder.convert_with_rules` / ``export_with_rules``).  Besides renames:

* FusedLeakyReLU biases are stored ``[1, C, 1, 1]`` in the release and ``[C]`` in Diffusers (kind ``"squeeze_1c11"``);
* ``linear1_kv`` is the concatenation ``[to_k; to_v]`` (kind ``"split"``);
* residual block ``convs.N`` of the release is Diffusers' ``res_blocks.{N - 1}``, the final conv ``convs.{blocks + 1}``
  is ``conv_out``;
* the blur kernels (``conv2.0.kernel`` / ``skip.0.kernel``: buffers of the original code, saved in the release) are
  checked against their fixed value and dropped; :func:`export_animate_state_dict` re-creates them.

Widths are read from the shapes (:func:`animate_config_from_state_dict`): nothing assumes the 14B release values, so
tiny test models and other widths convert the same way.  Unknown adapter keys raise
:class:`~diffusers_wan_ext.utils.ConversionError` naming them.

The relighting LoRA of the release (``relighting_lora.ckpt``, a PEFT state dict on the original module names with
rank = alpha = 128) converts with :func:`convert_relighting_lora` to a Diffusers LoRA that
``WanAnimatePipeline.load_lora_weights`` loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from ..lora.convert import convert_lora_state_dict
from ..utils.atomic import atomic_write_file
from ..utils.io import ConversionError, format_keys, load_state_dict
from .dit import block_indices
from .text_encoder import KeyRule, convert_with_rules, export_with_rules

__all__ = [
    "ANIMATE_KEY_RULES",
    "ANIMATE_PREFIXES",
    "RES_BLOCK_RULES",
    "animate_config_from_state_dict",
    "animate_key_rules",
    "convert_animate_state_dict",
    "convert_relighting_lora",
    "export_animate_state_dict",
    "find_relighting_lora",
    "is_animate_key",
    "save_relighting_lora",
]

#: Top-level modules of the Animate adapter (same names in both layouts).
ANIMATE_PREFIXES = ("pose_patch_embedding", "motion_encoder", "face_encoder", "face_adapter")

_ME = "motion_encoder.enc.net_app.convs"


def _weight_bias(original: str, ours: str, kind: str = "copy") -> tuple[KeyRule, KeyRule]:
    return tuple(KeyRule(f"{original}.{p}", (f"{ours}.{p}",), kind=kind) for p in ("weight", "bias"))


#: Original key -> stock ``WanAnimateTransformer3DModel`` key(s); ``{i}``: a face block / MLP layer index.
ANIMATE_KEY_RULES: tuple[KeyRule, ...] = (
    *_weight_bias("pose_patch_embedding", "pose_patch_embedding"),
    # motion encoder (LIA): 1x1 input conv with fused leaky ReLU, MLP, linear motion decomposition basis
    KeyRule(f"{_ME}.0.0.weight", ("motion_encoder.conv_in.weight",)),
    KeyRule(f"{_ME}.0.1.bias", ("motion_encoder.conv_in.act_fn.bias",), kind="squeeze_1c11"),
    *_weight_bias("motion_encoder.enc.fc.{i}", "motion_encoder.motion_network.{i}"),
    KeyRule("motion_encoder.dec.direction.weight", ("motion_encoder.motion_synthesis_weight",)),
    # face encoder (the original wraps each Conv1d in a CausalConv1d: ``.conv``)
    *_weight_bias("face_encoder.conv1_local.conv", "face_encoder.conv1_local"),
    *_weight_bias("face_encoder.conv2.conv", "face_encoder.conv2"),
    *_weight_bias("face_encoder.conv3.conv", "face_encoder.conv3"),
    *_weight_bias("face_encoder.out_proj", "face_encoder.out_proj"),
    KeyRule("face_encoder.padding_tokens", ("face_encoder.padding_tokens",)),
    # face blocks: per-latent-frame cross-attention to the face tokens
    *_weight_bias("face_adapter.fuser_blocks.{i}.linear1_q", "face_adapter.{i}.to_q"),
    *(KeyRule(f"face_adapter.fuser_blocks.{{i}}.linear1_kv.{p}", (f"face_adapter.{{i}}.to_k.{p}",
                                                                  f"face_adapter.{{i}}.to_v.{p}"), kind="split")
      for p in ("weight", "bias")),
    *_weight_bias("face_adapter.fuser_blocks.{i}.linear2", "face_adapter.{i}.to_out"),
    KeyRule("face_adapter.fuser_blocks.{i}.q_norm.weight", ("face_adapter.{i}.norm_q.weight",)),
    KeyRule("face_adapter.fuser_blocks.{i}.k_norm.weight", ("face_adapter.{i}.norm_k.weight",)),
)

#: One motion-encoder residual block: (key under release ``convs.N.``, key under Diffusers ``res_blocks.{N-1}.``, kind).
RES_BLOCK_RULES: tuple[tuple[str, str, str], ...] = (
    ("conv1.0.weight", "conv1.weight", "copy"),
    ("conv1.1.bias", "conv1.act_fn.bias", "squeeze_1c11"),
    ("conv2.1.weight", "conv2.weight", "copy"),
    ("conv2.2.bias", "conv2.act_fn.bias", "squeeze_1c11"),
    ("skip.1.weight", "conv_skip.weight", "copy"),
)
#: Constant blur FIR buffers of a residual block (not parameters in Diffusers).
BLUR_KERNEL_KEYS = ("conv2.0.kernel", "skip.0.kernel")
#: The blur FIR of the down-sampling blocks (``Blur([1, 3, 3, 1])``: outer product, normalised to sum 1).
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
#: The original code applies a face block after every 5th DiT block (``block_idx % 5 == 0``).
FACE_BLOCK_EVERY = 5


def animate_key_rules(num_res_blocks: int) -> tuple[KeyRule, ...]:
    """The full Animate adapter table for a motion encoder with ``num_res_blocks`` residual blocks (release: 7, for
    512 x 512 face crops): :data:`ANIMATE_KEY_RULES` plus :data:`RES_BLOCK_RULES` per block and the final conv."""
    res = tuple(
        KeyRule(f"{_ME}.{n}.{orig}", (f"motion_encoder.res_blocks.{n - 1}.{ours}",), kind=kind)
        for n in range(1, num_res_blocks + 1)
        for orig, ours, kind in RES_BLOCK_RULES
    )
    final = KeyRule(f"{_ME}.{num_res_blocks + 1}.weight", ("motion_encoder.conv_out.weight",))
    return ANIMATE_KEY_RULES + res + (final,)


def is_animate_key(key: str) -> bool:
    """Whether ``key`` (either layout) belongs to the Animate adapter."""
    return key.split(".", 1)[0] in ANIMATE_PREFIXES


def _blur_kernel() -> torch.Tensor:
    k = torch.tensor(BLUR_TAPS)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def _num_res_blocks(keys, layout: str) -> int:
    pat = re.compile(rf"^{re.escape(_ME)}\.(\d+)\.conv1\." if layout == "original" else r"^motion_encoder\.res_blocks\.(\d+)\.")
    idx = sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})
    expected = list(range(1, len(idx) + 1)) if layout == "original" else list(range(len(idx)))
    if idx != expected:
        where = f"{_ME}.N" if layout == "original" else "motion_encoder.res_blocks.N"
        raise ConversionError(f"motion encoder residual blocks are not contiguous ({where} indices {idx})")
    return len(idx)


def _check_blur(key: str, value: torch.Tensor) -> None:
    canonical = _blur_kernel()
    if tuple(value.shape) != tuple(canonical.shape) or not torch.allclose(value.float(), canonical, atol=1e-6):
        raise ConversionError(
            f"{key}: the motion encoder's blur kernel must be the fixed [1, 3, 3, 1] FIR (outer product / 64, shape "
            f"{tuple(canonical.shape)}); got shape {tuple(value.shape)}. Diffusers' WanAnimateTransformer3DModel "
            "re-creates this kernel, so a different one cannot be represented"
        )


def convert_animate_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Animate adapter keys of the original release -> stock ``WanAnimateTransformer3DModel`` names.

    ``sd`` holds only adapter keys (:func:`is_animate_key`); the DiT keys go through
    :func:`~diffusers_wan_ext.conversion.dit.convert_dit_state_dict`, which calls this for the adapter part.

    Example:
        >>> import torch
        >>> sorted(convert_animate_state_dict({"face_adapter.fuser_blocks.0.linear1_kv.weight": torch.zeros(8, 4)}))
        ['face_adapter.0.to_k.weight', 'face_adapter.0.to_v.weight']
    """
    n_res = _num_res_blocks(sd, "original")
    blur = [f"{_ME}.{n}.{k}" for n in range(1, n_res + 1) for k in BLUR_KERNEL_KEYS]
    for key in blur:
        if key in sd:
            _check_blur(key, sd[key])
    return convert_with_rules(sd, animate_key_rules(n_res), dropped=blur, what="Wan2.2-Animate adapter")


def export_animate_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_animate_state_dict` (Diffusers names -> the original release layout), blur
    kernels included, so ``export(convert(sd)) == sd``."""
    n_res = _num_res_blocks(sd, "diffusers")
    out = export_with_rules(sd, animate_key_rules(n_res), what="WanAnimateTransformer3DModel adapter")
    for n in range(1, n_res + 1):
        for k in BLUR_KERNEL_KEYS:
            out[f"{_ME}.{n}.{k}"] = _blur_kernel().to(sd[f"motion_encoder.res_blocks.{n - 1}.conv2.weight"].dtype)
    return out


# --------------------------------------------------------------------------------------------------------- config

#: Config entries of stock ``WanAnimateTransformer3DModel`` that :func:`animate_config_from_state_dict` derives; a
#: release ``config.json`` (or a fixture's ``animate_adapter_config``) stating one of them must agree with the shapes.
ANIMATE_CONFIG_KEYS = (
    "latent_channels", "motion_encoder_size", "motion_style_dim", "motion_dim", "motion_encoder_dim",
    "face_encoder_hidden_dim", "face_encoder_num_heads", "inject_face_latents_blocks",
)
#: Stock ``WanAnimateMotionEncoder`` has exactly this many EqualLinears (``enc.fc.0..4``), as the release.
MOTION_BLOCKS = 5
REQUIRED_ANIMATE_KEYS = (
    "pose_patch_embedding.weight",
    f"{_ME}.0.0.weight",
    "motion_encoder.enc.fc.0.weight",
    "motion_encoder.dec.direction.weight",
    "face_encoder.conv1_local.conv.weight",
    "face_encoder.conv2.conv.weight",
    "face_encoder.out_proj.weight",
    "face_adapter.fuser_blocks.0.q_norm.weight",
)


def animate_config_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    original_config: Mapping[str, Any] | None = None,
    *,
    dim: int,
    in_dim: int,
    num_layers: int,
    num_heads: int,
) -> dict[str, Any]:
    """Stock ``WanAnimateTransformer3DModel`` config entries of the Animate adapter in an ORIGINAL-layout state dict.

    Every width comes from the shapes: pose latent channels (``pose_patch_embedding``), face crop size (from the
    number of motion-encoder residual blocks: ``2 ** (blocks + 2)``), channel table, style / motion / motion-encoder
    widths, face-encoder width and heads.  ``original_config`` may state any of :data:`ANIMATE_CONFIG_KEYS` (and
    ``motion_encoder_channel_sizes``, ``face_adapter_heads``, ``motion_encoder_batch_size``); stated values must match.
    The face blocks follow every ``inject_face_latents_blocks`` DiT blocks (the release: 5).
    """
    cfg = dict(original_config or {})
    missing = [k for k in REQUIRED_ANIMATE_KEYS if k not in sd]
    if missing:
        raise ConversionError(
            f"incomplete Wan2.2-Animate adapter: missing key(s) {format_keys(missing)} (found "
            f"{format_keys([k for k in sd if is_animate_key(k)], 6)})"
        )
    pose = sd["pose_patch_embedding.weight"]
    latent = int(pose.shape[1])
    if pose.shape[0] != dim:
        raise ConversionError(f"pose_patch_embedding.weight {tuple(pose.shape)}: expected [{dim}, C, ...] (the DiT width)")
    if in_dim != 2 * latent + 4:
        raise ConversionError(
            f"Animate DiT: patch_embedding in_dim {in_dim} must be 2 x {latent} latent channels + 4 mask channels "
            f"(pose_patch_embedding.weight has {latent} input channels)"
        )
    n_res = _num_res_blocks(sd, "original")
    size = 2 ** (n_res + 2)
    channels = {str(size): int(sd[f"{_ME}.0.0.weight"].shape[0])}
    for i in range(1, n_res + 1):
        key = f"{_ME}.{i}.conv2.1.weight"
        if key not in sd:
            raise ConversionError(f"missing key {key} (motion encoder residual block {i})")
        channels[str(size >> i)] = int(sd[key].shape[0])
    last = f"{_ME}.{n_res + 1}.weight"
    if last not in sd:
        raise ConversionError(f"missing key {last} (the motion encoder's final conv after {n_res} residual blocks)")
    style = int(sd[last].shape[0])
    fc = block_indices(sd, "motion_encoder.enc.fc")
    if fc != list(range(MOTION_BLOCKS)):
        raise ConversionError(
            f"motion_encoder.enc.fc has layers {fc}; the Animate motion encoder has exactly {MOTION_BLOCKS} "
            f"(motion_encoder.enc.fc.0..{MOTION_BLOCKS - 1})"
        )
    direction = sd["motion_encoder.dec.direction.weight"]
    motion_encoder_dim, motion_dim = int(direction.shape[0]), int(direction.shape[1])
    face_hidden = int(sd["face_encoder.conv2.conv.weight"].shape[0])
    local_out = int(sd["face_encoder.conv1_local.conv.weight"].shape[0])
    if local_out % face_hidden:
        raise ConversionError(
            f"face_encoder.conv1_local.conv.weight has {local_out} output channels, not a multiple of the face "
            f"encoder width {face_hidden} (face_encoder.conv2.conv.weight)"
        )
    face_blocks = block_indices(sd, "face_adapter.fuser_blocks")
    every = int(cfg.get("inject_face_latents_blocks", FACE_BLOCK_EVERY))
    if face_blocks != list(range(num_layers // every)):
        raise ConversionError(
            f"{len(face_blocks)} face block(s) (face_adapter.fuser_blocks indices {face_blocks}) but a DiT of "
            f"{num_layers} blocks with a face block after every {every}th needs {num_layers // every}; give "
            "inject_face_latents_blocks in config.json if the model uses another spacing"
        )
    head_dim = int(sd["face_adapter.fuser_blocks.0.q_norm.weight"].shape[0])
    if head_dim * num_heads != dim or int(cfg.get("face_adapter_heads", num_heads)) != num_heads:
        raise ConversionError(
            f"face blocks with head dim {head_dim} (face_adapter.fuser_blocks.0.q_norm.weight) on a DiT of width {dim} "
            f"with {num_heads} heads: Diffusers' WanAnimateTransformer3DModel gives the face blocks the DiT's heads"
        )
    out = dict(
        latent_channels=latent,
        motion_encoder_channel_sizes=channels,
        motion_encoder_size=size,
        motion_style_dim=style,
        motion_dim=motion_dim,
        motion_encoder_dim=motion_encoder_dim,
        face_encoder_hidden_dim=face_hidden,
        face_encoder_num_heads=local_out // face_hidden,
        inject_face_latents_blocks=every,
        motion_encoder_batch_size=int(cfg.get("motion_encoder_batch_size", 8)),
    )
    wrong = [f"{k}={cfg[k]} (weights: {out[k]})" for k in ANIMATE_CONFIG_KEYS if k in cfg and int(cfg[k]) != out[k]]
    stated = cfg.get("motion_encoder_channel_sizes") or {}
    wrong += [f"motion_encoder_channel_sizes[{k!r}]={stated[k]} (weights: {v})"
              for k, v in channels.items() if k in stated and int(stated[k]) != v]
    if wrong:
        raise ConversionError(f"the config does not match the Animate adapter weights: {'; '.join(wrong)}")
    return out


# --------------------------------------------------------------------------------------------- relighting LoRA

#: Where releases keep the relighting LoRA (upstream ``wan_animate_14B.py``: ``lora_checkpoint``).
RELIGHTING_LORA_NAMES = ("relighting_lora.ckpt", "relighting_lora.safetensors", "relighting_lora")
_LORA_WRAPPERS = ("base_model.model.", "diffusion_model.", "model.")
#: Diffusers' file name for a pipeline LoRA (``save_lora_weights`` / ``load_lora_weights`` default).
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def find_relighting_lora(folder: str | Path) -> Path | None:
    """The relighting LoRA of an Animate release folder (``relighting_lora.ckpt``, or one weights file inside a
    ``relighting_lora/`` folder), or ``None``."""
    folder = Path(folder)
    for name in RELIGHTING_LORA_NAMES:
        p = folder / name
        if p.is_file():
            return p
        if p.is_dir():
            files = [f for f in sorted(p.iterdir()) if f.suffix in (".ckpt", ".safetensors", ".pth", ".pt", ".bin")]
            if len(files) != 1:
                raise ConversionError(
                    f"{p}: expected one LoRA weights file (.ckpt / .safetensors / .pth), found "
                    f"{[f.name for f in files] or 'none'}"
                )
            return files[0]
    return None


def convert_relighting_lora(
    sd_or_path: Mapping[str, torch.Tensor] | str | Path, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """The release's relighting LoRA (PEFT ``lora_A`` / ``lora_B`` on the original module names, e.g.
    ``blocks.0.self_attn.q.lora_A.weight``) -> a Diffusers pipeline LoRA (``transformer.blocks.0.attn1.to_q.lora_A.weight``).

    The keys are those of a DiffSynth-style LoRA, so this is :func:`diffusers_wan_ext.lora.convert_lora_state_dict`
    (``source="diffsynth"``; module names from the DiT key tables) after stripping PEFT / ComfyUI wrappers.  The
    relighting LoRA targets every Linear of the DiT blocks (self / cross attention incl. ``k_img`` / ``v_img``, FFN).
    ``alpha``: the LoRA alpha when it differs from the rank (upstream uses rank = alpha = 128, i.e. scale 1); a scale
    other than 1 is folded into ``lora_B`` so the result loads with Diffusers' default (alpha = rank).

    Example:
        >>> lora = convert_relighting_lora("Wan2.2-Animate-14B/relighting_lora.ckpt")  # doctest: +SKIP
        >>> pipe.load_lora_weights(lora, adapter_name="relighting")  # doctest: +SKIP
    """
    sd = load_state_dict(sd_or_path) if isinstance(sd_or_path, (str, Path)) else dict(sd_or_path)
    if not sd:
        raise ConversionError("the relighting LoRA state dict is empty")
    for prefix in _LORA_WRAPPERS:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    try:
        out = convert_lora_state_dict(sd, target="diffusers", source="diffsynth")
    except ConversionError as e:
        raise ConversionError(f"relighting LoRA: {e}") from e
    if alpha is not None:
        for key in [k for k in out if k.endswith(".lora_A.weight")]:
            scale = float(alpha) / out[key].shape[0]
            if scale != 1.0:
                b_key = key.replace(".lora_A.", ".lora_B.")
                out[b_key] = out[b_key] * scale
    return out


def save_relighting_lora(lora: Mapping[str, torch.Tensor], folder: str | Path, dtype: torch.dtype | None = None,
                         overwrite: bool = True) -> Path:
    """Write a converted relighting LoRA as ``folder/pytorch_lora_weights.safetensors`` (what
    ``pipe.load_lora_weights(folder)`` reads), atomically (:func:`~diffusers_wan_ext.utils.atomic.atomic_write_file`;
    with ``overwrite=False`` an existing file is an error); returns the file."""
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in lora.items()}
    return atomic_write_file(Path(folder) / DIFFUSERS_LORA_FILE, lambda tmp: save_file(tensors, str(tmp)),
                             overwrite=overwrite)

