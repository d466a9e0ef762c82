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

:data:`ANIMATE_KEY_MAP` is that layout as a table.  Each row is ``(original, diffusers, op)`` with placeholders
``{n}`` (an index kept as is), ``{res}`` (a motion-encoder residual block: original ``convs.{res}`` is Diffusers'
``res_blocks.{res - 1}``), ``{last}`` (the final conv, ``convs.{number of residual blocks + 1}``) and ``{p}``
(``weight`` / ``bias``).  ``op`` says what happens to the tensor besides the rename:

* ``"bias"`` -- FusedLeakyReLU biases are stored ``[1, C, 1, 1]`` in the release and ``[C]`` in Diffusers;
* ``"split"`` -- ``linear1_kv`` is the concatenation ``[to_k; to_v]`` (the Diffusers side names both);
* ``"blur"`` -- the constant blur kernels (buffers of the original code, saved in the release): checked against
  their canonical value and dropped; re-created on export.

Widths are read from the shapes (:func:`animate_config_from_state_dict`): nothing assumes the 14B release values, so
tiny test models and other widths convert the same way.  Unknown adapter keys raise
:class:`~diffusers_wan_ext.utils.ConversionError` naming them.

The relighting LoRA of the release (``relighting_lora.ckpt``, a PEFT state dict on the original module names with
rank = alpha = 128) converts with :func:`convert_relighting_lora` to a Diffusers LoRA that
``WanAnimatePipeline.load_lora_weights`` loads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..utils.io import ConversionError, _format_keys, load_state_dict

__all__ = [
    "ANIMATE_KEY_MAP",
    "ANIMATE_PREFIXES",
    "animate_config_from_state_dict",
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

#: (original key, Diffusers key(s), op) -- see the module docstring for placeholders and ops.
ANIMATE_KEY_MAP: tuple[tuple[str, str | tuple[str, ...] | None, str | None], ...] = (
    ("pose_patch_embedding.{p}", "pose_patch_embedding.{p}", None),
    # motion encoder: appearance convs
    (f"{_ME}.0.0.weight", "motion_encoder.conv_in.weight", None),
    (f"{_ME}.0.1.bias", "motion_encoder.conv_in.act_fn.bias", "bias"),
    (f"{_ME}.{{res}}.conv1.0.weight", "motion_encoder.res_blocks.{res}.conv1.weight", None),
    (f"{_ME}.{{res}}.conv1.1.bias", "motion_encoder.res_blocks.{res}.conv1.act_fn.bias", "bias"),
    (f"{_ME}.{{res}}.conv2.0.kernel", None, "blur"),
    (f"{_ME}.{{res}}.conv2.1.weight", "motion_encoder.res_blocks.{res}.conv2.weight", None),
    (f"{_ME}.{{res}}.conv2.2.bias", "motion_encoder.res_blocks.{res}.conv2.act_fn.bias", "bias"),
    (f"{_ME}.{{res}}.skip.0.kernel", None, "blur"),
    (f"{_ME}.{{res}}.skip.1.weight", "motion_encoder.res_blocks.{res}.conv_skip.weight", None),
    (f"{_ME}.{{last}}.weight", "motion_encoder.conv_out.weight", None),
    # motion encoder: MLP and the linear motion decomposition basis
    ("motion_encoder.enc.fc.{n}.{p}", "motion_encoder.motion_network.{n}.{p}", None),
    ("motion_encoder.dec.direction.weight", "motion_encoder.motion_synthesis_weight", None),
    # face encoder (the original wraps each Conv1d in a CausalConv1d module: ``.conv``)
    ("face_encoder.conv1_local.conv.{p}", "face_encoder.conv1_local.{p}", None),
    ("face_encoder.conv2.conv.{p}", "face_encoder.conv2.{p}", None),
    ("face_encoder.conv3.conv.{p}", "face_encoder.conv3.{p}", None),
    ("face_encoder.out_proj.{p}", "face_encoder.out_proj.{p}", None),
    ("face_encoder.padding_tokens", "face_encoder.padding_tokens", None),
    # face blocks
    ("face_adapter.fuser_blocks.{n}.linear1_q.{p}", "face_adapter.{n}.to_q.{p}", None),
    ("face_adapter.fuser_blocks.{n}.linear1_kv.{p}", ("face_adapter.{n}.to_k.{p}", "face_adapter.{n}.to_v.{p}"), "split"),
    ("face_adapter.fuser_blocks.{n}.linear2.{p}", "face_adapter.{n}.to_out.{p}", None),
    ("face_adapter.fuser_blocks.{n}.q_norm.weight", "face_adapter.{n}.norm_q.weight", None),
    ("face_adapter.fuser_blocks.{n}.k_norm.weight", "face_adapter.{n}.norm_k.weight", None),
)

#: The blur FIR of the motion encoder's down-sampling blocks (``Blur([1, 3, 3, 1])``: outer product, sum 1).
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
#: The original code applies a face block after every 5th DiT block (``block_idx % 5 == 0``).
FACE_BLOCK_EVERY = 5

_PLACEHOLDER = {"n": r"(?P<n>\d+)", "res": r"(?P<res>\d+)", "last": r"(?P<last>\d+)", "p": r"(?P<p>weight|bias)"}
# index offset original - diffusers per placeholder
_OFFSET = {"n": 0, "res": 1, "last": 0}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(_PLACEHOLDER[part] if i % 2 else re.escape(part))
    return re.compile("^" + "".join(out) + "$")


def _targets(diffusers: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if diffusers is None:
        return ()
    return (diffusers,) if isinstance(diffusers, str) else tuple(diffusers)


_ROWS = [(orig, _compile(orig), _targets(diff), [_compile(t) for t in _targets(diff)], op)
         for orig, diff, op in ANIMATE_KEY_MAP]


def is_animate_key(key: str) -> bool:
    """Whether ``key`` (either layout) belongs to the Animate adapter."""
    return key.split(".", 1)[0] in ANIMATE_PREFIXES


def _blur_kernel() -> torch.Tensor:
    k = torch.tensor(BLUR_TAPS)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def _fill(template: str, groups: Mapping[str, str], to_original: bool) -> str:
    values = {}
    for name, value in groups.items():
        if value is None:
            continue
        if name in _OFFSET:
            values[name] = str(int(value) + (_OFFSET[name] if to_original else -_OFFSET[name]))
        else:
            values[name] = value
    return template.format(**values)


def _num_res_blocks(keys, layout: str) -> int:
    pat = re.compile(rf"^{re.escape(_ME)}\.(\d+)\.conv1\." if layout == "original" else r"^motion_encoder\.res_blocks\.(\d+)\.")
    idx = sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})
    expected = list(range(1, len(idx) + 1)) if layout == "original" else list(range(len(idx)))
    if idx != expected:
        where = f"{_ME}.N" if layout == "original" else "motion_encoder.res_blocks.N"
        raise ConversionError(f"motion encoder residual blocks are not contiguous ({where} indices {idx})")
    return len(idx)


def convert_animate_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Animate adapter keys of the original release -> stock ``WanAnimateTransformer3DModel`` names.

    ``sd`` holds only adapter keys (:func:`is_animate_key`); the DiT keys go through
    :func:`~diffusers_wan_ext.conversion.dit.convert_dit_state_dict`, which calls this for the adapter part.

    Example:
        >>> import torch
        >>> convert_animate_state_dict({"face_adapter.fuser_blocks.0.linear1_kv.weight": torch.zeros(8, 4)}).keys()
        dict_keys(['face_adapter.0.to_k.weight', 'face_adapter.0.to_v.weight'])
    """
    n_res = _num_res_blocks(sd, "original")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        for _orig, pattern, targets, _tpats, op in _ROWS:
            m = pattern.match(key)
            if m is None:
                continue
            groups = m.groupdict()
            if groups.get("last") is not None and int(groups["last"]) != n_res + 1:
                continue  # ``convs.K.weight`` is the final conv only for K = residual blocks + 1
            if op == "blur":
                _check_blur(key, value)
            elif op == "split":
                if value.shape[0] % len(targets):
                    raise ConversionError(f"{key}: first dimension {value.shape[0]} is not divisible by {len(targets)}")
                for t, part in zip(targets, value.chunk(len(targets), dim=0)):
                    out[_fill(t, groups, to_original=False)] = part.clone()
            elif op == "bias":
                out[_fill(targets[0], groups, to_original=False)] = value.reshape(-1)
            else:
                out[_fill(targets[0], groups, to_original=False)] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not part of the Wan2.2-Animate adapter layout: {_format_keys(unknown)}"
        )
    return out


def _check_blur(key: str, value: torch.Tensor) -> None:
    canonical = _blur_kernel()
    if tuple(value.shape) != tuple(canonical.shape) or not torch.allclose(value.float(), canonical, atol=1e-6):
        raise ConversionError(
            f"{key}: the motion encoder's blur kernel must be the fixed [1, 3, 3, 1] FIR (outer product / 64, shape "
            f"{tuple(canonical.shape)}); got shape {tuple(value.shape)}. Diffusers' WanAnimateTransformer3DModel "
            "re-creates this kernel, so a different one cannot be represented"
        )


def _match_diffusers(key: str):
    """The row, match and target index of a Diffusers-layout adapter key (``None`` if no row names it)."""
    for row in _ROWS:
        for i, pattern in enumerate(row[3]):
            m = pattern.match(key)
            if m is not None:
                return row, m, i
    return None, None, None


def export_animate_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_animate_state_dict` (Diffusers names -> the original release layout), blur
    kernels included, so ``export(convert(sd)) == sd``."""
    n_res = _num_res_blocks(sd, "diffusers")
    out: dict[str, torch.Tensor] = {}
    partners, consumed, unknown = set(), set(), []
    for key, value in sd.items():
        row, m, i = _match_diffusers(key)
        if row is None:
            unknown.append(key)
            continue
        if i > 0:  # second half of a split row (``to_v``): written with its first half
            partners.add(key)
            continue
        orig, _pattern, targets, _tpats, op = row
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        name = _fill(orig.replace("{last}", str(n_res + 1)), groups, to_original=True)
        if op == "split":
            parts = [value]
            for t in targets[1:]:
                k = t.format(**groups)
                if k not in sd:
                    raise ConversionError(f"{key} has no partner {k} (both are needed for {name})")
                parts.append(sd[k])
                consumed.add(k)
            out[name] = torch.cat(parts, dim=0)
        elif op == "bias":
            out[name] = value.reshape(1, -1, 1, 1)
        else:
            out[name] = value
    unknown += sorted(partners - consumed)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not part of Diffusers' WanAnimateTransformer3DModel adapter layout: "
            f"{_format_keys(unknown)}"
        )
    blur_rows = [orig for orig, _d, op in ANIMATE_KEY_MAP if op == "blur"]
    for i in range(1, n_res + 1):
        for orig in blur_rows:
            out[orig.format(res=i)] = _blur_kernel()
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


def _indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


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
            f"incomplete Wan2.2-Animate adapter: missing key(s) {_format_keys(missing)} (found "
            f"{_format_keys([k for k in sd if is_animate_key(k)], 6)})"
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
    fc = _indices(sd, "motion_encoder.enc.fc")
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
    face_blocks = _indices(sd, "face_adapter.fuser_blocks")
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
_LORA_SUFFIX = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.default)?\.weight$")
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

    Module names go through the DiT key table of :mod:`~diffusers_wan_ext.conversion.dit` (the relighting LoRA
    targets every Linear of the DiT blocks: self / cross attention incl. ``k_img`` / ``v_img``, FFN).  ``alpha``:
    the LoRA alpha when it differs from the rank (upstream uses rank = alpha = 128, i.e. scale 1); a scale other
    than 1 is folded into ``lora_B`` so the result loads with Diffusers' default (alpha = rank).

    Example:
        >>> lora = convert_relighting_lora("Wan2.2-Animate-14B/relighting_lora.ckpt")  # doctest: +SKIP
        >>> pipe.load_lora_weights(lora, adapter_name="relighting")  # doctest: +SKIP
    """
    from .dit import BLOCK_KEY_MAP, _rename

    if isinstance(sd_or_path, (str, Path)):
        sd = load_state_dict(sd_or_path)
    else:
        sd = dict(sd_or_path)
    for prefix in _LORA_WRAPPERS:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    ranks = {}
    for key, value in sd.items():
        m = _LORA_SUFFIX.match(key)
        block = re.match(r"^blocks\.(\d+)\.(.+)$", m.group("module")) if m else None
        local = _rename(block.group(2), BLOCK_KEY_MAP) if block else None
        if local is None:
            unknown.append(key)
            continue
        name = f"transformer.blocks.{block.group(1)}.{local}.{m.group('ab')}.weight"
        if m.group("ab") == "lora_A":
            ranks[name] = int(value.shape[0])
        out[name] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not LoRA weights on Wan DiT block modules (expected e.g. "
            f"blocks.0.self_attn.q.lora_A.weight): {_format_keys(unknown)}"
        )
    if not out:
        raise ConversionError("the relighting LoRA state dict is empty")
    def partner(k: str) -> str:
        return k.replace(".lora_A.", ".lora_B.") if ".lora_A." in k else k.replace(".lora_B.", ".lora_A.")

    unpaired = sorted(k for k in out if partner(k) not in out)
    if unpaired:
        raise ConversionError(f"LoRA weights without their lora_A / lora_B partner: {_format_keys(unpaired)}")
    if alpha is not None:
        for a_key, rank in ranks.items():
            scale = float(alpha) / rank
            if scale != 1.0:
                b_key = a_key.replace(".lora_A.", ".lora_B.")
                out[b_key] = out[b_key] * scale
    return out


def save_relighting_lora(lora: Mapping[str, torch.Tensor], folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a converted relighting LoRA as ``folder/pytorch_lora_weights.safetensors`` (what
    ``pipe.load_lora_weights(folder)`` reads); returns the file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DIFFUSERS_LORA_FILE
    save_file({k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in lora.items()}, str(path))
    return path
