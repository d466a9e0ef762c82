"""Attention backend auto-selection through Diffusers' attention dispatch.

Wan's transformers (stock ``WanAttnProcessor`` and our :class:`~diffusers_wan_ext.WanTextLenAttnProcessor`) call
``diffusers.models.attention_dispatch.dispatch_attention_fn(..., backend=processor._attention_backend)``, so the
kernel is chosen per processor with :meth:`diffusers.ModelMixin.set_attention_backend`.  This module picks the fastest
backend that can run here, in the order of :data:`ATTENTION_PREFERENCE`:

====================  =================================================================================
``_flash_3``          flash-attn 3 (``flash_attn_interface``, built from source), CUDA, fp16/bf16
``flash``             flash-attn 2 (``flash-attn>=2.6.3``; no prebuilt wheel), CUDA, fp16/bf16
``sage``              SageAttention (``sageattention>=2.1.1``; PyPI has only 1.0.6), CUDA, fp16/bf16
``_native_cudnn``     PyTorch SDPA with the cuDNN kernel: CUDA compute capability >= 9.0 (Hopper), cuDNN SDPA
                      enabled, fp16/bf16
``native``            PyTorch SDPA (always available)
====================  =================================================================================

A package counts as installed only if Diffusers' own requirement check passes
(``attention_dispatch._check_attention_backend_requirements``: version floor and a working import), e.g. Diffusers'
``sage`` backend refuses sageattention 1.0.6.  Hub backends (``*_hub``, which download kernels) are never picked
automatically; they can still be requested by name.

FlashAttention-3 in fp8 (``flash_3_fp8``, :mod:`.flash3_fp8`) changes numerics, so it is no row of that table and
never picked: :func:`~diffusers_wan_ext.runtime.optimize_transformer` runs it for self-attention only when asked
(``self_attention="flash_3_fp8"``); :func:`attention_backend_report` lists its status last.

The choice is per model: :func:`set_attention_backend` sets the processors of the pipeline's transformers
(``transformer``, ``transformer_2``; VAE and text encoders do not use the dispatch) and leaves Diffusers' global
active backend as it was, so another pipeline in the same process keeps its own setting.

Example:
    >>> from diffusers_wan_ext.runtime import set_attention_backend
    >>> set_attention_backend(pipe)  # doctest: +SKIP
    diffusers_wan_ext: attention backend '_native_cudnn' on transformer (flash-attn 3: not installed; ...)
    >>> set_attention_backend(pipe, "native")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable, NamedTuple

import torch
from diffusers.utils import logging

from .flash3_fp8 import FLASH3_FP8_BACKEND, flash3_fp8_unavailable_reason
from .flash4 import FLASH4_BACKEND, flash4_unavailable_reason, register_local_flash4
from .sage import register_traceable_sage

__all__ = [
    "ATTENTION_PREFERENCE",
    "AttentionChoice",
    "attention_backend_report",
    "available_attention_backends",
    "reset_attention_backend",
    "select_attention_backend",
    "set_attention_backend",
    "attention_models",
]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

#: Backends that only run on a CUDA (or ROCm, which torch also calls "cuda") device.
_CUDA_ONLY_PREFIXES = ("flash", "_flash", "sage", "_sage", "aiter")
_CUDA_ONLY = {"_native_cudnn", "_native_flash", "_native_efficient", "xformers"}
#: Backends whose kernels take fp16/bf16 only (Diffusers' ``_check_qkv_dtype_bf16_or_fp16`` constraint).
_HALF_ONLY_PREFIXES = ("flash", "_flash", "sage", "aiter")
_HALF_ONLY = {"_native_cudnn", "_native_flash", "_native_npu"}

# distribution name, Diffusers' minimum version (None: no floor), how to get it -- per package-backed backend
_PACKAGES: dict[str, tuple[str, str | None, str]] = {
    "flash": (
        "flash-attn",
        "_REQUIRED_FLASH_VERSION",
        "pip install 'flash-attn>={version}' --no-build-isolation (there is no prebuilt wheel: it compiles against "
        "the installed torch, which takes a while)",
    ),
    "_flash_3": (
        "flash_attn_3",
        None,
        "build flash-attn 3 from source (Dao-AILab/flash-attention, hopper/: python setup.py install); it "
        "provides flash_attn_interface",
    ),
    "sage": (
        "sageattention",
        "_REQUIRED_SAGE_VERSION",
        "install sageattention>={version} from source (thu-ml/SageAttention: pip install . --no-build-isolation; "
        "PyPI only has 1.0.6, which Diffusers refuses)",
    ),
}


def _dist_version(dist: str) -> str | None:
    for name in (dist, dist.replace("-", "_"), dist.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _requirement_reason(backend: str) -> str | None:
    """Why Diffusers' requirement check refuses ``backend`` (``None``: it passes)."""
    from diffusers.models import attention_dispatch as ad

    try:
        ad._check_attention_backend_requirements(ad.AttentionBackendName(backend))
    except RuntimeError as e:
        key = _package_key(backend)
        if key is None:
            return str(e).rstrip(".")
        dist, floor_attr, _ = _PACKAGES[key]
        floor = getattr(ad, floor_attr, None) if floor_attr else None
        version = _dist_version(dist)
        if version is None:
            return "not installed"
        if floor is not None:
            from packaging.version import InvalidVersion, Version

            try:
                if Version(version) < Version(floor):
                    return f"{dist} {version} < {floor}"
            except InvalidVersion:
                pass
        return f"{dist} {version} installed but unusable (failed to import; see Diffusers' warning)"
    return None


def _needs_cuda(backend: str) -> bool:
    return backend in _CUDA_ONLY or backend.startswith(_CUDA_ONLY_PREFIXES)


def _needs_half(backend: str) -> bool:
    return backend in _HALF_ONLY or backend.startswith(_HALF_ONLY_PREFIXES)


def _cuda_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA GPU" if device.type == "cpu" else f"needs a CUDA GPU (device is {device})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _half_reason(dtype: torch.dtype | None) -> str | None:
    # fp8 storage (layerwise casting, VRAM management) computes in bf16/fp16: only full precision is refused
    if dtype in (torch.float32, torch.float64):
        return f"needs fp16/bf16 weights (the transformer is {str(dtype).replace('torch.', '')})"
    return None


def _package_backend(backend: str) -> Callable[[torch.device, torch.dtype | None], str | None]:
    def condition(device: torch.device, dtype: torch.dtype | None) -> str | None:
        return _requirement_reason(backend) or _cuda_reason(device) or _half_reason(dtype)

    condition.__name__ = f"requires_{backend.strip('_')}"
    return condition


def _cudnn_sdpa(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """PyTorch's cuDNN SDPA kernel: Hopper or newer (compute capability >= 9.0), cuDNN SDPA available and enabled."""
    reason = _cuda_reason(device)
    if reason:
        return reason
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return f"compute capability {major}.{minor} < 9.0 (Hopper)"
    if not torch.backends.cudnn.is_available():
        return "torch has no cuDNN"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN SDPA disabled (torch.backends.cuda.enable_cudnn_sdp(True))"
    return _half_reason(dtype)


def _always(device: torch.device, dtype: torch.dtype | None) -> str | None:
    return None


def _flash4_local(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """The locally installed flash-attn 4 package (CuTe DSL), run through Diffusers' ``flash_4_hub`` slot."""
    return _cuda_reason(device) or flash4_unavailable_reason(device, dtype)


def _set_local_flash4(model: torch.nn.Module) -> None:
    """Points every attention processor of ``model`` at the local flash-attn 4 kernel (see :mod:`.flash4`).

    ``ModelMixin.set_attention_backend`` would insist on the ``kernels`` package for ``flash_4_hub``; the local
    package needs no download, so the processors are set directly, as that method does after its checks."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import AttentionBackendName

    register_local_flash4()
    for module in model.modules():
        if isinstance(module, AttentionModuleMixin) and hasattr(module.processor, "_attention_backend"):
            module.processor._attention_backend = AttentionBackendName.FLASH_4_HUB


class AttentionChoice(NamedTuple):
    """One row of :data:`ATTENTION_PREFERENCE`.

    Attributes:
        backend: a :class:`diffusers.models.attention_dispatch.AttentionBackendName` value.
        condition: ``condition(device, dtype) -> None`` when the backend can run on ``device`` with weights of
            ``dtype`` (``None``: any dtype), else the reason it cannot (shown in the log line and errors).
        label: human name used in messages.
    """

    backend: str
    condition: Callable[[torch.device, torch.dtype | None], str | None]
    label: str


#: Backends in order of preference; :func:`select_attention_backend` takes the first whose condition holds.
ATTENTION_PREFERENCE: tuple[AttentionChoice, ...] = (
    AttentionChoice("_flash_3", _package_backend("_flash_3"), "flash-attn 3"),
    AttentionChoice(FLASH4_BACKEND, _flash4_local, "flash-attn 4 (local)"),
    AttentionChoice("flash", _package_backend("flash"), "flash-attn 2"),
    AttentionChoice("sage", _package_backend("sage"), "sage"),
    AttentionChoice("_native_cudnn", _cudnn_sdpa, "cuDNN SDPA"),
    AttentionChoice("native", _always, "SDPA"),
)


def _default_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None``: the current CUDA device if CUDA is available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        try:
            return torch.device("cuda", torch.cuda.current_device())
        except (AssertionError, RuntimeError):
            return torch.device("cuda")
    return torch.device("cpu")


def _preference_report(device: torch.device, dtype: torch.dtype | None) -> dict[str, str | None]:
    return {choice.backend: choice.condition(device, dtype) for choice in ATTENTION_PREFERENCE}


def attention_backend_report(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, str | None]:
    """``{backend: None if it can run, else why not}`` for every row of :data:`ATTENTION_PREFERENCE`, in order, then
    ``flash_3_fp8`` (FlashAttention-3 fp8, self-attention only and opt-in: ``optimize_transformer(...,
    self_attention="flash_3_fp8")``; never chosen by ``"auto"``)."""
    dev = _default_device(device)
    report = _preference_report(dev, dtype)
    report[FLASH3_FP8_BACKEND] = flash3_fp8_unavailable_reason(dev, dtype)
    return report


def available_attention_backends(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> list[str]:
    """The backends of :data:`ATTENTION_PREFERENCE` that can run on ``device`` (default: the current CUDA device,
    else the CPU) with weights of ``dtype`` (default: any), fastest first.  ``"native"`` is always among them."""
    return [name for name, reason in _preference_report(_default_device(device), dtype).items() if reason is None]


def select_attention_backend(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> str:
    """The fastest backend of :data:`ATTENTION_PREFERENCE` that can run on ``device`` with weights of ``dtype``.

    Example:
        >>> from diffusers_wan_ext.runtime import select_attention_backend
        >>> select_attention_backend("cpu")
        'native'
    """
    return available_attention_backends(device, dtype)[0]


def _skipped_summary(report: dict[str, str | None], chosen: str) -> str:
    labels = {c.backend: c.label for c in ATTENTION_PREFERENCE}
    parts = []
    for name, reason in report.items():
        if name == chosen:
            break
        parts.append(f"{labels[name]}: {reason}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- applying it
def _uses_dispatch(model: torch.nn.Module) -> bool:
    """Whether ``model`` has attention processors that go through Diffusers' dispatch (``_attention_backend``)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for module in model.modules():
        if isinstance(module, (Attention, AttentionModuleMixin)):
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_attention_backend"):
                return True
    return False


def attention_models(pipe_or_model: Any) -> list[tuple[str, Any]]:
    """``[(name, model)]``: the model itself, or a pipeline's ModelMixin components that use the dispatch."""
    from diffusers import ModelMixin

    if isinstance(pipe_or_model, ModelMixin):
        if not _uses_dispatch(pipe_or_model):
            raise ValueError(
                f"{type(pipe_or_model).__name__} has no attention processors that use Diffusers' attention dispatch; "
                "set the backend on a transformer (or on the pipeline)"
            )
        return [(type(pipe_or_model).__name__, pipe_or_model)]
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"set_attention_backend takes a Diffusers pipeline or model, got {type(pipe_or_model).__name__}"
        )
    models = [(n, m) for n, m in components.items() if isinstance(m, ModelMixin) and _uses_dispatch(m)]
    if not models:
        raise ValueError(
            f"{type(pipe_or_model).__name__} has no component whose attention uses Diffusers' dispatch (no "
            "transformer loaded?)"
        )
    return models


def _target_device_and_dtype(pipe_or_model: Any, models: list[tuple[str, Any]]) -> tuple[torch.device, torch.dtype]:
    """Where the transformers run: their device if on CUDA, else the pipeline's execution device if on CUDA
    (model offload), else the default device (current CUDA device when available: they will be moved there).
    The dtype is the transformers' common dtype (fp32 if they differ and one is fp32)."""
    device = None
    for _, model in models:
        try:
            d = model.device
        except (AttributeError, StopIteration):
            continue
        if d.type == "cuda":
            device = d
            break
    if device is None:
        try:
            execution = getattr(pipe_or_model, "_execution_device", None)
        except Exception:  # noqa: BLE001 - a pipeline without components on a device
            execution = None
        if isinstance(execution, torch.device) and execution.type == "cuda":
            device = execution
    dtypes = {model.dtype for _, model in models}
    dtype = torch.float32 if torch.float32 in dtypes else next(iter(dtypes))
    return _default_device(device), dtype


def _normalize(backend: Any) -> str:
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = backend.value if isinstance(backend, AttentionBackendName) else str(backend).lower()
    valid = [b.value for b in AttentionBackendName]
    if name != "auto" and name not in valid:
        raise ValueError(f"unknown attention backend {backend!r}: pass 'auto' or one of {', '.join(valid)}")
    return name


def _explicit_reason(name: str, device: torch.device) -> str | None:
    if name == FLASH4_BACKEND and _flash4_local(device, None) is None:
        return None  # the local package serves the Hub backend's slot
    reason = _requirement_reason(name)
    if reason is None and _needs_cuda(name):
        reason = _cuda_reason(device)
    if reason is None and name == "_native_cudnn" and not torch.backends.cudnn.is_available():
        reason = "torch has no cuDNN"
    return reason


def _package_key(name: str) -> str | None:
    if name in ("_flash_3", "_flash_varlen_3"):
        return "_flash_3"
    if name in ("flash", "flash_varlen"):
        return "flash"
    if name.startswith(("sage", "_sage")) and not name.endswith("_hub"):
        return "sage"
    return None


def _install_hint(name: str, reason: str) -> str:
    from diffusers.models import attention_dispatch as ad

    key = _package_key(name)
    if key is not None and _requirement_reason(name) is not None:
        _, floor_attr, hint = _PACKAGES[key]
        return hint.format(version=getattr(ad, floor_attr, "") if floor_attr else "")
    if name.endswith("_hub") and "kernels" in reason:
        return "pip install -U 'kernels>=0.12' (the kernel is downloaded from the Hub on first use)"
    if "CUDA" in reason:
        return "run the pipeline on a CUDA GPU" + (" with a torch build that has cuDNN" if "cudnn" in name else "")
    return ""


def set_attention_backend(
    pipe_or_model: Any,
    backend: str = "auto",
    *,
    verbose: bool = True,
    device: str | torch.device | None = None,
) -> str:
    """Set the attention backend of a pipeline's transformers (or of one model) and return its name.

    Args:
        pipe_or_model: a Diffusers pipeline (every ModelMixin component whose attention uses Diffusers' dispatch:
            ``transformer``, ``transformer_2``; VAE and text encoders are left alone) or one model.
        backend: ``"auto"`` (the fastest available, :func:`select_attention_backend` for the transformers' device
            and dtype) or an ``AttentionBackendName`` value (``"native"``, ``"flash"``, ``"_native_cudnn"``, ...).
        verbose: log the choice (and why faster backends were skipped) as a warning; ``False``: debug level.
        device: where the transformers will run, for ``"auto"``; default: their device if on CUDA, the pipeline's
            execution device if on CUDA (offload), else the current CUDA device when there is one, else the CPU.

    Raises:
        ValueError: an unknown name, or a backend that cannot run here (the message says why, what is available
            and what to install).

    Example:
        >>> set_attention_backend(pipe)  # doctest: +SKIP
        'flash'
        >>> set_attention_backend(pipe.transformer, "native", verbose=False)  # doctest: +SKIP
        'native'
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = _normalize(backend)
    models = attention_models(pipe_or_model)
    target, dtype = _target_device_and_dtype(pipe_or_model, models)
    if device is not None:
        target = torch.device(device)
    if name == "auto":
        report = _preference_report(target, dtype)
        name = next(n for n, reason in report.items() if reason is None)
        skipped = _skipped_summary(report, name)
        detail = f" ({skipped})" if skipped else ""
    else:
        reason = _explicit_reason(name, target)
        if reason is not None:
            hint = _install_hint(name, reason)
            key = _package_key(name)
            if reason == "not installed" and key is not None:
                reason = f"{_PACKAGES[key][0]} is not installed"
            status = "; ".join(
                f"{c.label} ({c.backend!r}): {r or 'available'}"
                for c, r in zip(ATTENTION_PREFERENCE, _preference_report(target, dtype).values())
            )
            raise ValueError(
                f"attention backend {name!r} cannot be used here: {reason}. "
                f"Here: {status}. Use one of {', '.join(available_attention_backends(target, dtype))} or "
                "backend='auto'" + (f"; to get {name!r}: {hint}" if hint else "")
            )
        if _needs_half(name) and _half_reason(dtype):
            logger.warning(
                f"attention backend {name!r} takes fp16/bf16 only, but the transformer is "
                f"{str(dtype).replace('torch.', '')}: cast the pipeline (e.g. .to(torch.bfloat16)) before running"
            )
        detail = " (requested)"

    previous = _AttentionBackendRegistry._active_backend
    try:
        for _, model in models:
            if name == FLASH4_BACKEND and _flash4_local(target, dtype) is None:
                _set_local_flash4(model)
            else:
                if name == "sage":
                    register_traceable_sage()  # sageattention 2.x through a custom op: fullgraph compile traces it
                model.set_attention_backend(name)
    finally:
        # ModelMixin.set_attention_backend also makes `name` Diffusers' global default; keep the choice per model
        _AttentionBackendRegistry.set_active_backend(previous)

    message = (
        f"diffusers_wan_ext: attention backend {name!r} on {', '.join(n for n, _ in models)}{detail}"
    )
    (logger.warning if verbose else logger.debug)(message)
    return name


def reset_attention_backend(pipe_or_model: Any) -> None:
    """Undo :func:`set_attention_backend`: the processors use Diffusers' default again (``DIFFUSERS_ATTN_BACKEND``
    or the ``attention_backend`` context manager; ``native`` unless set)."""
    for _, model in attention_models(pipe_or_model):
        model.reset_attention_backend()
