"""One call that puts a Wan transformer (or a pipeline's transformers) in our fastest exact configuration.

:func:`optimize_transformer` does, in order:

1. **attention** -- the fastest installed exact kernel through Diffusers' dispatch
   (:func:`~diffusers_wan_ext.runtime.attention.set_attention_backend`, ``"auto"``);
2. **fp8** (opt-in) -- float8 GEMMs for the blocks' linear layers: a model loaded from an fp8 / scaled-fp8 file
   (:class:`~diffusers_wan_ext.models.quantized_linear.Fp8Linear` layers) computes with ``torch._scaled_mm`` on the
   stored weight and the file's scale (dynamic activation scales, per row or per tensor); a bf16 model is quantized
   the way scaled-fp8 files are (``fp8="rowwise"`` / ``"tensorwise"``) or through torchao (``fp8=True`` /
   ``"torchao"``). This changes numerics, so it is never a default; the benchmark reports its error against bf16;
3. **fusions** -- FFN GELU in the GEMM epilogue, fused QKV / KV projections (one copy of the weights), and the
   self-attention q/k RMSNorm + RoPE as one Triton kernel (:mod:`diffusers_wan_ext.ops.qk_norm_rope`);
4. **compile** -- regional ``torch.compile`` of the repeated blocks (``compile_repeated_blocks(fullgraph=True)``
   with :data:`COMPILE_OPTIONS`): one compiled block reused by every layer, so compile time stays short and hooks
   on the model (step caching, motion control, offloading) keep working around the compiled blocks.

Opt-in, never automatic (changes numerics): ``self_attention="flash_3_fp8"`` runs the blocks' self-attention
through FlashAttention-3 in fp8 (:mod:`diffusers_wan_ext.runtime.flash3_fp8`); cross-attention keeps ``attention``.

Example:
    >>> from diffusers_wan_ext.runtime import optimize_transformer
    >>> optimize_transformer(pipe)  # doctest: +SKIP
    {'attention_backend': 'flash_4_hub', 'compiled': ['transformer'], 'fp8': False, 'fused_gelu': True,
     'fused_qkv': True, 'fused_qk_rope': 30}
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from diffusers.utils import logging

from ..hooks.vram import CASTING_HOOKS, GROUP_OFFLOAD_HOOKS
from ..models.attention_processor import WanFusedQKRopeAttnProcessor
from ..models.quantized_linear import FP8_GEMM_MODES, Fp8Linear
from .attention import attention_models, set_attention_backend
from .flash3_fp8 import FLASH3_FP8_BACKEND, flash3_fp8_unavailable_reason, set_flash3_fp8_self_attention

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

#: Diffusers hooks that move or cast weights inside forward (the ones VRAM management installs): Dynamo cannot
#: trace them (``module.to`` builds new Parameters), so regional compile is skipped on models that carry them.
_UNCOMPILABLE_HOOKS = GROUP_OFFLOAD_HOOKS + CASTING_HOOKS


#: Inductor options of the regional compile: coordinate-descent tuning of the generated kernels' block sizes (the
#: LayerNorm + modulation kernels of a 14B block go from 2.2-2.8 to 2.7-2.9 TB/s on an H100; ~15-30 s more compile).
#: Not ``triton.multi_kernel``: with torch 2.11 / Triton 3.6 a multi-kernel graph loaded back from Inductor's on-disk
#: FX graph cache fails (``MultiKernelCall.load_cache`` -> ``JITFunction.cache_key``: ``_hash_lock`` is None), so the
#: second process that compiles the same model would crash.
COMPILE_OPTIONS: dict = {"coordinate_descent_tuning": True}


def _weight_moving_hooks(model: torch.nn.Module) -> list[str]:
    found = set()
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            found.update(name for name in _UNCOMPILABLE_HOOKS if registry.get_hook(name) is not None)
    return sorted(found)


def _fp8_linears(model: torch.nn.Module) -> int:
    """Swaps the blocks' nn.Linear layers to torchao float8 training-free inference (dynamic activation scaling)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ImportError("fp8=True needs torchao (pip install torchao) and a GPU with float8 support (sm89+)") from exc

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`; fp8 applies to the transformer blocks")
    quantize_(blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0)
    return sum(1 for m in blocks.modules() if isinstance(m, torch.nn.Linear))


#: ``optimize_transformer(fp8=...)`` values besides ``True`` / ``False``
FP8_CHOICES = ("torchao",) + tuple(mode for mode in FP8_GEMM_MODES if mode != "upcast")


def apply_fp8(model: torch.nn.Module, fp8: bool | str) -> str:
    """Switch ``model``'s blocks to fp8 GEMMs; returns how (``"rowwise"``, ``"tensorwise"`` or ``"torchao"``).

    ``True``: a model holding :class:`Fp8Linear` layers (an fp8 / scaled-fp8 file) computes them with fp8 GEMMs on the
    stored weights and the file's scales, per-row activation scales; any other model goes through torchao.
    ``"rowwise"`` / ``"tensorwise"``: the same fp8 GEMM with that activation scaling, and the blocks' remaining
    ``nn.Linear`` layers are first quantized to :class:`Fp8Linear` (one scale per weight, as scaled-fp8 files
    store them). ``"torchao"``: torchao's float8 dynamic-activation layers (bf16 models only).
    """
    if fp8 is not True and fp8 not in FP8_CHOICES:
        raise ValueError(f"fp8: expected True, False or one of {', '.join(FP8_CHOICES)}, got {fp8!r}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`; fp8 applies to the transformer blocks")
    has_fp8 = any(isinstance(m, Fp8Linear) for m in model.modules())
    if fp8 == "torchao" or (fp8 is True and not has_fp8):
        if has_fp8:
            raise ValueError("fp8='torchao': the model already holds Fp8Linear layers (an fp8 file); use fp8=True")
        _fp8_linears(model)
        return "torchao"
    mode = "rowwise" if fp8 is True else fp8
    if fp8 is not True:
        quantize_block_linears(blocks)
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.set_fp8_gemm(mode)
    return mode


@torch.no_grad()
def quantize_block_linears(blocks: torch.nn.Module) -> int:
    """Replace every plain ``nn.Linear`` inside ``blocks`` by :meth:`Fp8Linear.from_linear` (e4m3, one scale per
    weight); returns how many. Layers wrapped by adapters or of other classes are left as they are."""
    count = 0
    for name, module in list(blocks.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        parent, _, child = name.rpartition(".")
        setattr(blocks.get_submodule(parent) if parent else blocks, child, Fp8Linear.from_linear(module))
        count += 1
    return count


@torch.no_grad()
def fuse_fp8_projections(attn: torch.nn.Module) -> bool:
    """Diffusers' ``fuse_projections`` for an attention whose projections are :class:`Fp8Linear`: the fused layer
    (:meth:`Fp8Linear.concatenated`) stacks the stored fp8 weights and carries each part's scale per row, and the
    separate layers' weights become row views of it (one copy). Returns ``False`` (nothing done) for other layers."""
    cross = getattr(attn, "is_cross_attention", None)
    if cross is None:
        return False
    groups = {"to_kv": FUSED_PROJECTIONS["to_kv"]} if cross else {"to_qkv": FUSED_PROJECTIONS["to_qkv"]}
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        groups["to_added_kv"] = FUSED_PROJECTIONS["to_added_kv"]
    parts_of = {name: [getattr(attn, part) for part in names] for name, names in groups.items()}
    if not all(isinstance(p, Fp8Linear) for parts in parts_of.values() for p in parts):
        return False
    for fused_name, parts in parts_of.items():
        fused = Fp8Linear.concatenated(parts)
        setattr(attn, fused_name, fused)
        row = 0
        for p in parts:
            p.weight.data = fused.weight.data[row:row + p.out_features]
            if p.bias is not None:
                p.bias.data = fused.bias.data[row:row + p.out_features]
            row += p.out_features
    attn.fused_projections = True
    return True


def optimize_transformer(
    pipe_or_model: Any,
    *,
    attention: str = "auto",
    compile: bool = True,
    fullgraph: bool = True,
    fp8: bool | str = False,
    fused_gelu: bool = True,
    fuse_qkv: bool = True,
    fused_qk_rope: bool = True,
    fused_norms: bool = True,
    compile_options: dict | None = None,
    compile_backend: str | Callable = "inductor",
    verbose: bool = True,
    self_attention: str | None = None,
) -> dict:
    """Apply the fast defaults to every transformer of a pipeline (``transformer``, ``transformer_2``) or to one model.

    Args:
        pipe_or_model: a Wan pipeline or transformer (ours or stock Diffusers').
        attention: ``"auto"`` or a Diffusers backend name (see :mod:`diffusers_wan_ext.runtime.attention`).
        compile: regional ``torch.compile`` of the repeated blocks (needs a working compiler; off on CPU tests).
        fullgraph: passed to ``compile_repeated_blocks``.
        fp8: float8 GEMMs (Hopper/Ada; changes numerics): ``True`` uses an fp8 file's weights and scales as stored
            (:class:`~diffusers_wan_ext.models.quantized_linear.Fp8Linear`, ``torch._scaled_mm``, per-row activation
            scales), or torchao for a bf16 model; ``"rowwise"`` / ``"tensorwise"`` quantize a bf16 model's block
            linears like a scaled-fp8 file first; ``"torchao"``: torchao float8 (see :func:`apply_fp8`). Off CUDA
            the fp8 layers upcast their weights (same results as without ``fp8``, up to the weights' rounding).
        fused_gelu: FFN first linear + tanh-GELU as one GEMM with a GELU epilogue (:func:`fuse_ffn_gelu`).
        fuse_qkv: Diffusers' ``fuse_projections`` on every attention (one QKV GEMM for self-attention, one KV GEMM
            for cross-attention); the separate layers' weights then become row views of the fused weight
            (:func:`share_fused_storage`), so there is still one copy. Load LoRAs before calling this (the fused
            layers do not see adapters added later). An optimized model shares storage between layers: save the
            un-optimized one.
        fused_qk_rope: run each self-attention's q/k RMSNorm + RoPE as one Triton kernel
            (:class:`~diffusers_wan_ext.WanFusedQKRopeAttnProcessor`; needs ``fuse_qkv``; layers whose processor is
            not stock ``WanAttnProcessor`` keep theirs).
        fused_norms: run each block's residual adds + LayerNorms + adaLN modulation as three Triton kernels
            (:func:`fuse_block_norms`, :mod:`diffusers_wan_ext.ops.layer_norm_mod`); blocks of other classes keep
            their forward.
        compile_options: Inductor options for the regional compile (``torch.compile(options=...)``); default
            :data:`COMPILE_OPTIONS`.
        compile_backend: the ``torch.compile`` backend (default Inductor; the options are Inductor's and are passed
            only to it).  Sliding windows (:mod:`diffusers_wan_ext.hooks.sliding_window`) need nothing more: every
            window but a shorter last one has the same shape, so the blocks compile once for the window and once
            more (with a dynamic token count) for the shorter last window, never per window or per step.
        verbose: log the attention choice.
        self_attention: ``None`` (default: self-attention uses ``attention`` like every layer) or
            ``"flash_3_fp8"``: the blocks' self-attention (``attn1``) runs FlashAttention-3 in fp8 e4m3 with one
            scale per head (:mod:`~diffusers_wan_ext.runtime.flash3_fp8`; Hopper, FlashAttention-3 built with FP8);
            changes numerics (~1.5e-2 relative error on Wan 14B), so never chosen automatically. Refused with the
            reason when it cannot run here.

    Returns:
        A report: ``attention_backend``, ``compiled`` (component names), ``fp8`` (``False`` or the path:
        ``"rowwise"``, ``"tensorwise"``, ``"torchao"``), ``fused_gelu``, ``fused_qkv`` and
        ``fused_qk_rope`` (how many self-attention layers use the fused q/k kernel) and ``fused_norms`` (how many
        blocks use the fused norm kernels); with ``self_attention`` also ``self_attention`` (its name) and
        ``self_attention_layers`` (how many layers use it).
    """
    if fp8 is not False and fp8 is not True and fp8 not in FP8_CHOICES:
        raise ValueError(f"fp8: expected True, False or one of {', '.join(FP8_CHOICES)}, got {fp8!r}")
    if self_attention is not None:
        _check_self_attention(pipe_or_model, self_attention)
    backend = set_attention_backend(pipe_or_model, attention, verbose=verbose)
    compiled, n_fused_qk, n_norms, fp8_path, n_self = [], 0, 0, False, 0
    for name, model in attention_models(pipe_or_model):
        if fp8:
            fp8_path = apply_fp8(model, fp8)
        elif fused_gelu:
            fuse_ffn_gelu(model)
        if fuse_qkv:
            for m in model.modules():
                if hasattr(m, "fuse_projections") and not getattr(m, "fused_projections", False):
                    if any(isinstance(getattr(m, n, None), Fp8Linear) for n in ("to_q", "to_k", "to_v")):
                        fuse_fp8_projections(m)  # all parts fp8, or left unfused (never cast into nn.Linear)
                    else:
                        m.fuse_projections()
                        share_fused_storage(m)
        if fuse_qkv and fused_qk_rope:
            n_fused_qk += _use_fused_qk_rope(model)
        if fused_norms:
            n_norms += fuse_block_norms(model)
        if self_attention is not None:  # after the processor swaps above, which copy the backend
            n_self += set_flash3_fp8_self_attention(model)
        hooks = _weight_moving_hooks(model) if compile else []
        if hooks:
            logger.warning(f"optimize_transformer: not compiling {name}: it carries {', '.join(hooks)} hooks "
                           "(VRAM management / layerwise casting), which torch.compile cannot trace")
        elif compile:
            if not getattr(model, "_repeated_blocks", None):
                raise ValueError(f"{type(model).__name__} declares no _repeated_blocks; use torch.compile(model)")
            options = COMPILE_OPTIONS if compile_options is None else compile_options
            extra = {"options": dict(options)} if options and compile_backend == "inductor" else {}
            model.compile_repeated_blocks(fullgraph=fullgraph, backend=compile_backend, **extra)
            compiled.append(name)
    report = {"attention_backend": backend, "compiled": compiled, "fp8": fp8_path,
              "fused_gelu": fused_gelu and not fp8, "fused_qkv": fuse_qkv, "fused_qk_rope": n_fused_qk,
              "fused_norms": n_norms}
    if self_attention is not None:
        report.update(self_attention=self_attention, self_attention_layers=n_self)
    return report


def _self_attention_head_dim(model: torch.nn.Module) -> int | None:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "attn1" and getattr(module, "heads", None) and hasattr(module, "inner_dim"):
            return module.inner_dim // module.heads
    return None


def _check_self_attention(pipe_or_model: Any, self_attention: str) -> None:
    """Refuse ``self_attention`` (one line) unless it is ``"flash_3_fp8"`` and can run for every transformer."""
    if self_attention != FLASH3_FP8_BACKEND:
        raise ValueError(f"self_attention: expected None or {FLASH3_FP8_BACKEND!r}, got {self_attention!r}")
    for name, model in attention_models(pipe_or_model):
        device = model.device if model.device.type == "cuda" else None
        reason = flash3_fp8_unavailable_reason(device, model.dtype, _self_attention_head_dim(model))
        if reason is not None:
            raise ValueError(f"self_attention={self_attention!r} cannot be used for {name}: {reason}")


#: fused projection -> the layers it concatenates (Diffusers' ``WanAttention.fuse_projections``), in row order
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_kv": ("add_k_proj", "add_v_proj"),
}


@torch.no_grad()
def share_fused_storage(attn: torch.nn.Module) -> int:
    """Point the separate q/k/v layers' weights at row slices of their fused copy; returns how many layers.

    Diffusers' ``fuse_projections`` keeps the separate layers (for ``unfuse_projections``), which costs a second
    copy of every attention input projection (10 GiB on Wan 14B). Views keep both paths valid with one copy.
    Layers that are not plain ``nn.Linear`` (LoRA-wrapped, hooked) or differ in device/dtype keep their own copy.
    """
    shared = 0
    for fused_name, part_names in FUSED_PROJECTIONS.items():
        fused = getattr(attn, fused_name, None)
        if not isinstance(fused, torch.nn.Linear):
            continue
        parts = [getattr(attn, name, None) for name in part_names]
        if not all(type(p) is torch.nn.Linear and p.weight.device == fused.weight.device
                   and p.weight.dtype == fused.weight.dtype and (p.bias is None) == (fused.bias is None)
                   for p in parts):
            continue
        if sum(p.out_features for p in parts) != fused.out_features:
            continue
        row = 0
        for p in parts:
            p.weight.data = fused.weight.data[row:row + p.out_features]
            if p.bias is not None:
                p.bias.data = fused.bias.data[row:row + p.out_features]
            row += p.out_features
            shared += 1
    return shared


def _use_fused_qk_rope(model: torch.nn.Module) -> int:
    """Swap stock ``WanAttnProcessor`` on self-attention layers for the fused q/k norm + RoPE processor (keeping
    the attention backend and context-parallel config); returns how many layers use it."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    count = 0
    for m in model.modules():
        proc = getattr(m, "processor", None)
        if type(proc) is WanFusedQKRopeAttnProcessor:
            count += 1
        elif type(proc) is WanAttnProcessor and not getattr(m, "is_cross_attention", True):
            new = WanFusedQKRopeAttnProcessor()
            new._attention_backend = proc._attention_backend
            new._parallel_config = proc._parallel_config
            m.processor = new
            count += 1
    return count


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("diffusers_wan_ext::linear_gelu_tanh", mutates_args=())
    def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``gelu_tanh(x @ weight.T + bias)`` with the GELU in the cuBLASLt epilogue (one pass instead of two)."""
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @linear_gelu_tanh.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fused_gelu_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    proj = self.proj
    # only a plain, un-hooked nn.Linear in the activation dtype (LoRA layers, offloading or casting hooks: stock path)
    # (the fused op has no backward: with gradients recorded, the stock path)
    if (type(proj) is torch.nn.Linear and "forward" not in vars(proj) and proj.bias is not None
            and not torch.is_grad_enabled()
            and hidden_states.is_cuda and proj.weight.dtype == hidden_states.dtype):
        return linear_gelu_tanh(hidden_states, proj.weight, proj.bias)
    return type(self).forward(self, hidden_states)


def fuse_ffn_gelu(model: torch.nn.Module) -> int:
    """Run each FFN's first linear + tanh-GELU as one cuBLASLt GEMM with a GELU epilogue; returns how many.

    Applies to Diffusers ``GELU(approximate="tanh")`` activation modules (Wan's FFN). The stock forward is kept as the
    fallback for LoRA-wrapped or hooked layers, so adapters, offloading and casting keep working."""
    import types

    from diffusers.models.activations import GELU

    count = 0
    for m in model.modules():
        if isinstance(m, GELU) and m.approximate == "tanh":
            m.forward = types.MethodType(_fused_gelu_forward, m)
            count += 1
    return count


def _fusable_norm(norm: torch.nn.Module, channels: int) -> bool:
    """A LayerNorm over the last ``channels`` with both or neither affine parameters (FP32LayerNorm included)."""
    return (isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == (channels,)
            and (norm.weight is None) == (norm.bias is None))


#: stock ``WanTransformerBlock.forward`` as a plain function: Dynamo traces a call of it, but not of
#: ``type(self).forward`` (the block class is in its allowed-in-graph list once regional compile marks it)
STOCK_BLOCK_FORWARD = WanTransformerBlock.forward


def _fused_norm_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                              temb: torch.Tensor, rotary_emb: Any) -> torch.Tensor:
    """Stock ``WanTransformerBlock.forward`` with each residual add + LayerNorm + modulation as one kernel."""
    from ..ops.layer_norm_mod import ln_modulate, ln_modulate_supported

    channels = hidden_states.shape[-1]
    if (torch.is_grad_enabled() or temb.ndim not in (3, 4) or not ln_modulate_supported(hidden_states)
            or not (_fusable_norm(self.norm1, channels) and _fusable_norm(self.norm3, channels)
                    and (_fusable_norm(self.norm2, channels) or isinstance(self.norm2, torch.nn.Identity)))):
        return STOCK_BLOCK_FORWARD(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
    if temb.ndim == 4:  # per-token modulation (Wan2.2 TI2V): (B, N, 6, C)
        mods = [m.squeeze(2) for m in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods
    n1, n2, n3 = self.norm1, self.norm2, self.norm3

    x = hidden_states
    y = ln_modulate(x, None, None, scale_msa, shift_msa, n1.weight, n1.bias, n1.eps)
    attn_output = self.attn1(y, None, None, rotary_emb)
    if isinstance(n2, torch.nn.Identity):
        x = y = (x.float() + attn_output * gate_msa).type_as(x)
    else:
        x, y = ln_modulate(x, attn_output, gate_msa, None, None, n2.weight, n2.bias, n2.eps)
    attn_output = self.attn2(y, encoder_hidden_states, None, None)
    x, y = ln_modulate(x, attn_output, None, c_scale_msa, c_shift_msa, n3.weight, n3.bias, n3.eps)
    ff_output = self.ffn(y)
    return (x.float() + ff_output.float() * c_gate_msa).type_as(x)


def fuse_block_norms(model: torch.nn.Module) -> int:
    """Give every stock ``WanTransformerBlock`` of ``model`` the fused-norm forward; returns how many blocks.

    Per block, the three "residual add + LayerNorm (fp32) + adaLN modulation" steps each become one
    :func:`~diffusers_wan_ext.ops.layer_norm_mod.ln_modulate` launch that reads the residual stream once. Same
    numerics as stock (fp32 statistics, one rounding per output). Blocks whose class overrides ``forward`` keep
    theirs; with gradients recorded, off CUDA (without the Triton interpreter) or with other norm layers, the
    patched forward runs the stock one.
    """
    import types

    count = 0
    for m in model.modules():
        if isinstance(m, WanTransformerBlock) and type(m).forward is WanTransformerBlock.forward:
            if "forward" not in vars(m):
                m.forward = types.MethodType(_fused_norm_block_forward, m)
            count += getattr(vars(m)["forward"], "__func__", None) is _fused_norm_block_forward
    return count
