"""flash-attn 4 (the CuTe-DSL ``flash-attn-4`` package) as a local kernel behind Diffusers' attention dispatch.

Diffusers 0.42 knows flash-attn 4 only as the Hub backend ``flash_4_hub`` (downloaded through ``kernels``). When the
``flash-attn-4`` package is installed locally (``pip install flash-attn-4``; it brings ``nvidia-cutlass-dsl``), we
hand its ``flash_attn_func`` to that backend's registry slot, so processors set to ``flash_4_hub`` run the local
kernel through ``dispatch_attention_fn`` without any download. The call goes through a ``torch.library`` custom op,
so ``torch.compile(fullgraph=True)`` treats it as one opaque node.

flash-attn 4 has forward kernels for Hopper (sm90) and Blackwell (sm100); :func:`flash4_unavailable_reason` says
why it cannot be used here, or returns None. On Hopper the call passes our measured configuration
(:data:`SM90_CONFIGS`). :func:`register_local_flash4` also registers the backend as context-parallel capable: under
Diffusers' context parallelism (Ulysses / Ring) each rank runs the kernel inside Diffusers' templated attention,
with a twin op that returns the log-sum-exp for the ring merge (forward only).
"""

from __future__ import annotations

import functools

import torch

FLASH4_BACKEND = "flash_4_hub"
_INSTALL_HINT = "pip install flash-attn-4 (CuTe-DSL kernels; needs nvidia-cutlass-dsl and a Hopper/Blackwell GPU)"


#: Forward configuration on Hopper per head dim: (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap), the knobs of
#: flash-attn 4's ``_flash_attn_fwd``; a head dim not listed keeps the package's choice (128x128, P in registers,
#: intra-warpgroup overlap for hdim 128). For hdim 128 the 192-row tile runs three consumer warpgroups (P in registers,
#: no overlap: the 128-register budget of three warpgroups has no room for it). Measured on an H100 at Wan's shapes,
#: sustained, with the board at its 700 W limit (~1.45 GHz): 692 vs 670 TFLOP/s (40 heads x 75600 tokens) and 679 vs
#: 671 (12 x 32760); each query tile reads the whole K/V once, so 1.5x taller tiles move a third less K/V from L2
#: per FLOP, which is what a power-limited GPU rewards. Same results bit for bit (the key tile is unchanged).
#: See docs/benchmarks.md.
SM90_CONFIGS: dict[int, tuple[int, int, bool, bool]] = {128: (192, 128, True, False)}


@functools.lru_cache(maxsize=1)
def _flash4_import():
    try:
        from flash_attn.cute import interface  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return None, f"not installed ({type(exc).__name__}: {str(exc)[:80]}); {_INSTALL_HINT}"
    fwd = getattr(interface, "_flash_attn_fwd", None)
    if fwd is None:
        return (lambda q, k, v, softmax_scale, causal, config, return_lse=False: interface.flash_attn_func(
            q, k, v, softmax_scale=softmax_scale, causal=causal, **({"return_lse": True} if return_lse else {}))), None

    def call(q, k, v, softmax_scale, causal, config, return_lse=False):
        knobs = {} if config is None else dict(
            tile_mn=tuple(config[:2]), mma_pv_is_rs=config[2], intra_wg_overlap=config[3])
        if return_lse:
            knobs["return_lse"] = True
        return fwd(q, k, v, softmax_scale=softmax_scale, causal=causal, **knobs)

    return call, None


def flash4_unavailable_reason(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """None when the local flash-attn 4 kernels can run on ``device`` with ``dtype``; otherwise the reason."""
    if not torch.cuda.is_available():
        return "needs CUDA"
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return f"needs a CUDA device (got {device})"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16 (got {dtype})"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in (9, 10):
        return f"has kernels for sm90/sm100 only (this GPU is sm{major}x)"
    _, reason = _flash4_import()
    return reason


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):

    def _run(q, k, v, softmax_scale, causal, return_lse):
        func, reason = _flash4_import()
        if func is None:
            raise RuntimeError(f"flash-attn 4 is {reason}")
        sm90 = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
        config = SM90_CONFIGS.get(q.shape[-1]) if sm90 and not causal else None
        out = func(q, k, v, softmax_scale, causal, config, return_lse)
        return out if isinstance(out, tuple) else (out, None)

    @torch.library.custom_op("diffusers_wan_ext::flash_attn4", mutates_args=())
    def flash_attn4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                    causal: bool = False) -> torch.Tensor:
        """flash-attn 4 forward on ``(batch, seq, heads, head_dim)`` tensors (output in the same layout)."""
        return _run(q, k, v, softmax_scale, causal, False)[0]

    @flash_attn4.register_fake
    def _(q, k, v, softmax_scale=None, causal=False):
        return q.new_empty(q.shape)

    @torch.library.custom_op("diffusers_wan_ext::flash_attn4_lse", mutates_args=())
    def flash_attn4_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                        causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`flash_attn4` that also returns the softmax log-sum-exp, fp32 ``(batch, heads, seq)``."""
        out, lse = _run(q, k, v, softmax_scale, causal, True)[:2]
        return out, lse.contiguous()

    @flash_attn4_lse.register_fake
    def _(q, k, v, softmax_scale=None, causal=False):
        return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _kernel_fn(q, k, v, softmax_scale=None, causal=False, **unused):
    if unused:
        raise ValueError(f"flash-attn 4 (local): unsupported arguments {sorted(unused)}")
    return flash_attn4(q, k, v, softmax_scale, causal)


def _cp_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """The per-rank attention of Diffusers' templated context parallelism (Ulysses / Ring / both): out, and the
    log-sum-exp as ``(batch, seq, heads)`` when the ring merge asks for it. Inference only (nothing is saved)."""
    if attn_mask is not None or dropout_p or enable_gqa:
        raise ValueError("flash-attn 4 (local): attention masks, dropout and GQA are not supported")
    if return_lse:
        out, lse = flash_attn4_lse(query, key, value, scale, is_causal)
        return out, lse.transpose(1, 2)
    return flash_attn4(query, key, value, scale, is_causal)


def _cp_backward_op(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError(
        "flash-attn 4 (local) runs the forward only; for training under context parallelism use a backend with a "
        "backward (set_attention_backend(model, '_native_cudnn') or 'flash')"
    )


def _flash4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, scale: float | None = None, is_causal: bool = False,
                      return_lse: bool = False, _parallel_config=None):
    """Diffusers' ``flash_4_hub`` backend function on the local package, with context parallelism: under a
    ``ParallelConfig`` the call goes through Diffusers' templated Ulysses / Ring attention with :func:`_cp_forward_op`
    on every rank (the stock 0.42 function refuses context parallelism)."""
    if attn_mask is not None:
        raise ValueError("`attn_mask` is not supported for flash-attn 4.")
    if _parallel_config is not None:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        return _templated_context_parallel_attention(
            query, key, value, None, 0.0, is_causal, scale, False, return_lse,
            forward_op=_cp_forward_op, backward_op=_cp_backward_op, _parallel_config=_parallel_config)
    if return_lse:
        return flash_attn4_lse(query, key, value, scale, is_causal)
    return flash_attn4(query, key, value, scale, is_causal)


def register_local_flash4() -> None:
    """Points Diffusers' ``flash_4_hub`` backend at the local flash-attn 4 package (no download), and registers it
    as able to run context parallel (Ulysses / Ring through Diffusers' templated attention)."""
    from diffusers.models import attention_dispatch as ad

    name = ad.AttentionBackendName.FLASH_4_HUB
    ad._HUB_KERNELS_REGISTRY[name].kernel_fn = _kernel_fn
    registry = ad._AttentionBackendRegistry
    if registry._backends.get(name) is not _flash4_attention:
        registry.register(name, constraints=registry._constraints.get(name), supports_context_parallel=True)(
            _flash4_attention)
