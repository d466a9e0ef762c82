"""FlashAttention-3 in fp8 (e4m3) for the transformer blocks' self-attention, behind Diffusers' attention dispatch.

FlashAttention-3 (Dao-AILab/flash-attention ``hopper/``, module ``flash_attn_interface``; built and carried by
``benchmarks/fa3_build.sh``) has an fp8 e4m3 forward on Hopper (sm90): q / k / v in e4m3 with fp32 "descale" factors
of shape ``(batch, kv_heads)``, output in bf16. :func:`flash3_fp8_attention` quantizes q / k / v with one scale per
batch x head (:func:`quantize_fp8_heads`: amax over tokens and channels / 448) and calls the kernel through the
``torch.library`` custom op :func:`flash3_fp8_op`. The quantization stays outside the op, so a regionally compiled
block (``torch.compile(fullgraph=True)``) fuses it into its own kernels; the op is one opaque node.

This changes numerics (relative error ~1.5e-2 on Wan 14B at 720p against bf16 attention), so it is never picked
automatically: :func:`~diffusers_wan_ext.runtime.optimize_transformer` turns it on for self-attention only
(``self_attention="flash_3_fp8"``), cross-attention keeps the ``attention`` backend.

How it is wired into Diffusers 0.42: ``dispatch_attention_fn`` looks the processor's ``_attention_backend`` up in
``_AttentionBackendRegistry`` by :class:`~diffusers.models.attention_dispatch.AttentionBackendName`, a closed enum.
Taking over an existing slot (``_flash_3``) would also turn every other processor on that slot to fp8 (``"auto"``
picks ``_flash_3`` wherever FA3 is installed), so :func:`register_flash3_fp8` instead makes one extra
``AttentionBackendName`` instance, value ``"flash_3_fp8"``, known to value lookups (``AttentionBackendName(
"flash_3_fp8")``, pickling) but not listed among the enum's members (iteration, ``__members__``, Diffusers'
``set_attention_backend`` names are unchanged), and registers :func:`flash3_fp8_backend_fn` under it. Only the
processors given that key (the blocks' ``attn1``, :func:`set_flash3_fp8_self_attention`) use it. Attention masks,
dropout, the log-sum-exp and context parallelism are refused with one ``ValueError`` line.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "FLASH3_FP8_BACKEND",
    "FP8_MAX",
    "flash3_fp8_attention",
    "flash3_fp8_backend_fn",
    "flash3_fp8_op",
    "flash3_fp8_unavailable_reason",
    "quantize_fp8_heads",
    "register_flash3_fp8",
    "set_flash3_fp8_self_attention",
]

#: the backend's name (an ``AttentionBackendName`` value made by :func:`register_flash3_fp8`)
FLASH3_FP8_BACKEND = "flash_3_fp8"
#: largest finite float8 e4m3fn value
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
#: FlashAttention-3 head-dim buckets (a head dim runs the kernel of the next bucket up: ``round_up_headdim``)
_HEAD_DIM_BUCKETS = (64, 96, 128, 192, 256)
_BUILD_HINT = "build it with benchmarks/fa3_build.sh (forward, hdim 128, bf16 + fp8, sm90a) and put it on sys.path"
_REFUSED = ("flash_3_fp8 attention takes no attention mask, dropout, log-sum-exp or context parallelism "
            "(use it for self-attention without context parallelism, or another backend)")


def quantize_fp8_heads(x: torch.Tensor, kv_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch, seq, heads, dim)`` fp16/bf16 -> (float8 e4m3fn tensor, fp32 descale ``(batch, kv_heads)``).

    One scale per batch x head: the amax over tokens and channels / :data:`FP8_MAX` (clamped away from 0), so
    ``x ~= x8.float() * descale[:, None, :, None]``. ``kv_heads`` (default ``heads``) fewer than ``heads`` (GQA: a
    query for grouped key / value heads) shares one scale per group of ``heads // kv_heads`` consecutive heads, the
    ``(batch, kv_heads)`` shape FlashAttention-3 reads for ``q_descale`` too."""
    batch, _, heads, _ = x.shape
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"quantize_fp8_heads: {heads} heads do not split into {kv_heads} key/value head groups")
    amax = x.abs().amax(dim=(1, 3)).float()
    if kv_heads != heads:
        amax = amax.view(batch, kv_heads, heads // kv_heads).amax(dim=-1)
    descale = amax.clamp(min=1e-12) / FP8_MAX
    per_head = descale if kv_heads == heads else descale.repeat_interleave(heads // kv_heads, dim=1)
    x8 = (x / per_head[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, descale.contiguous()


@torch.library.custom_op("diffusers_wan_ext::flash3_fp8", mutates_args=())
def flash3_fp8_op(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                  k_descale: torch.Tensor, v_descale: torch.Tensor, softmax_scale: float | None = None,
                  causal: bool = False) -> torch.Tensor:
    """``flash_attn_interface.flash_attn_func`` on e4m3 ``(batch, seq, heads, dim)`` tensors with fp32 descales
    ``(batch, kv_heads)``; bf16 output ``(batch, seq_q, heads, dim)``."""
    from flash_attn_interface import flash_attn_func  # optional: FlashAttention-3 built from source

    out = flash_attn_func(q8, k8, v8, softmax_scale=softmax_scale, causal=causal, q_descale=q_descale,
                          k_descale=k_descale, v_descale=v_descale)
    out = out[0] if isinstance(out, tuple) else out  # older builds return (out, lse)
    return out.to(torch.bfloat16).contiguous()


@flash3_fp8_op.register_fake
def _(q8, k8, v8, q_descale, k_descale, v_descale, softmax_scale=None, causal=False):
    return q8.new_empty((*q8.shape[:-1], v8.shape[-1]), dtype=torch.bfloat16)


def flash3_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                         is_causal: bool = False) -> torch.Tensor:
    """Attention on ``(batch, seq, heads, dim)`` fp16/bf16 tensors through FlashAttention-3 fp8: q / k / v
    quantized by :func:`quantize_fp8_heads`, output in ``query``'s dtype and layout."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_3_fp8 attention takes fp16/bf16 query/key/value, got {query.dtype}")
    if is_causal and query.shape[1] != key.shape[1]:
        raise ValueError("flash_3_fp8 attention: is_causal needs equal query and key lengths (FlashAttention-3 "
                         "aligns the causal mask bottom-right, SDPA top-left)")
    kv_heads = key.shape[2]
    q8, q_descale = quantize_fp8_heads(query, kv_heads)
    k8, k_descale = quantize_fp8_heads(key)
    v8, v_descale = quantize_fp8_heads(value)
    out = flash3_fp8_op(q8, k8, v8, q_descale, k_descale, v_descale, scale, is_causal)
    return out.to(query.dtype)


def flash3_fp8_backend_fn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                          scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                          _parallel_config: Any = None) -> torch.Tensor:
    """The function Diffusers' dispatch calls for ``flash_3_fp8`` (:func:`flash3_fp8_attention`, refusing what
    the kernel path does not do)."""
    if attn_mask is not None or dropout_p or return_lse or _parallel_config is not None:
        raise ValueError(_REFUSED)
    return flash3_fp8_attention(query, key, value, scale, is_causal)


def _device_capability(device: torch.device | str | None) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device`` (default: the current CUDA device); None off CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def _fa3_build() -> tuple[dict | None, str | None]:
    """FlashAttention-3's build flags (``flash_attn_config.CONFIG['build_flags']``, ``{}`` when the build has no
    config module), or None and why ``flash_attn_interface`` cannot be imported."""
    try:
        from flash_attn_interface import flash_attn_func  # optional: FlashAttention-3 built from source
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return None, f"flash_attn_interface is not importable ({type(exc).__name__}: {str(exc)[:80]}); {_BUILD_HINT}"
    if not callable(flash_attn_func):
        return None, f"flash_attn_interface.flash_attn_func is not callable; {_BUILD_HINT}"
    try:
        from flash_attn_config import CONFIG
    except Exception:  # noqa: BLE001 - builds before the config module: assume every feature
        return {}, None
    return dict(CONFIG.get("build_flags", {})), None


def flash3_fp8_unavailable_reason(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                                  head_dim: int | None = None) -> str | None:
    """None when FlashAttention-3 fp8 can run on ``device`` (default: the current CUDA device) for activations of
    ``dtype`` and heads of ``head_dim`` (None: not checked); otherwise the reason, one line."""
    capability = _device_capability(device)
    if capability is None:
        if device is not None and torch.device(device).type != "cuda":
            return f"needs a CUDA GPU (device is {device})"
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if capability[0] != 9:
        return f"FlashAttention-3 fp8 kernels are for Hopper (sm90) only; this GPU is sm{capability[0]}{capability[1]}"
    if dtype in (torch.float32, torch.float64):
        return f"needs fp16/bf16 activations (the model is {str(dtype).replace('torch.', '')})"
    flags, reason = _fa3_build()
    if flags is None:
        return reason
    if flags.get("FLASHATTENTION_DISABLE_FP8"):
        return f"the installed FlashAttention-3 was built without FP8 (FLASH_ATTENTION_DISABLE_FP8); {_BUILD_HINT}"
    if head_dim is not None:
        bucket = next((b for b in _HEAD_DIM_BUCKETS if head_dim <= b), None)
        built = [b for b in _HEAD_DIM_BUCKETS if not flags.get(f"FLASHATTENTION_DISABLE_HDIM{b}")]
        if bucket is None or bucket not in built:
            return (f"the installed FlashAttention-3 has no kernel for head dim {head_dim} (built: "
                    f"{', '.join(map(str, built)) or 'none'})")
        if head_dim % 16:
            return f"fp8 needs a head dim that is a multiple of 16 (got {head_dim})"
    return None


def register_flash3_fp8():
    """Registers :func:`flash3_fp8_backend_fn` in Diffusers' attention dispatch under an ``AttentionBackendName``
    of value ``"flash_3_fp8"`` (made once, see the module docstring) and returns that key; calling it again only
    returns the key."""
    from diffusers.models import attention_dispatch as ad

    enum = ad.AttentionBackendName
    key = enum._value2member_map_.get(FLASH3_FP8_BACKEND)
    if key is None:
        key = str.__new__(enum, FLASH3_FP8_BACKEND)
        key._name_, key._value_ = "FLASH_3_FP8", FLASH3_FP8_BACKEND
        enum._value2member_map_[FLASH3_FP8_BACKEND] = key
    registry = ad._AttentionBackendRegistry
    if registry._backends.get(key) is not flash3_fp8_backend_fn:
        registry.register(key, constraints=[])(flash3_fp8_backend_fn)
    return key


def set_flash3_fp8_self_attention(model: torch.nn.Module) -> int:
    """Point the self-attention processors of ``model``'s blocks (modules named ``attn1`` that are not
    cross-attention and go through Diffusers' dispatch) at ``flash_3_fp8``; returns how many.

    Raises:
        ValueError: one of them runs context parallel (``_parallel_config`` set), which the kernel path refuses.
    """
    targets = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if (name.rsplit(".", 1)[-1] == "attn1" and not getattr(module, "is_cross_attention", False)
                and hasattr(processor, "_attention_backend")):
            if getattr(processor, "_parallel_config", None) is not None:
                raise ValueError(f"self_attention='flash_3_fp8': {name} runs context parallel; {_REFUSED}")
            targets.append(processor)
    key = register_flash3_fp8()
    for processor in targets:
        processor._attention_backend = key
    return len(targets)
