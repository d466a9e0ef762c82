"""The log lines bitsandbytes and torchao write when Diffusers imports them, and the filters that drop exactly those.

``import diffusers`` imports bitsandbytes and torchao whenever they are installed (its quantizer registry), and on a
CPU machine that prints lines a user cannot act on:

* bitsandbytes (``bitsandbytes.backends.cpu.ops``): "Failed to load CPU gemm_4bit_forward from kernels-community"
  (an optional hub kernel; bitsandbytes uses its own CPU kernel instead), and with ``HF_HUB_OFFLINE=1`` the
  ``kernels`` package's "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'" first;
* torchao (``torchao``): "Failed to load .../torchao/_C_mxfp8...so" / "_C_cutlass_90a...so" -- its CUDA-only
  extensions, which a CPU build of torch can never load (dropped only when torch has no CUDA / ROCm);
* torch (``torch.utils._pytree``): "<enum ...> is an Enum subclass and is now natively supported by torch.compile"
  for torchao's own enums (torchao still registers them the old way);
* Diffusers (``diffusers.quantizers.torchao.torchao_quantizer``): "Unable to import `torchao` Tensor objects" with
  torchao >= 0.18, where ``NF4Tensor`` moved; it concerns pickled torchao checkpoints only (this package writes and
  reads safetensors).

Each filter sits on the one logger that emits the line and drops only records of that message: every other record
of those loggers (and every ``warnings.warn``) still shows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["BITSANDBYTES_CPU_KERNEL", "MessageFilter", "QUANTIZER_IMPORT_NOISE", "silence_quantizer_import_noise"]


class MessageFilter(logging.Filter):
    """Drops the records of one logger whose unformatted message starts with ``prefix`` and for which ``accept``
    (given the record) is true; lets every other record through."""

    def __init__(self, prefix: str, accept=None) -> None:
        super().__init__()
        self.prefix = prefix
        self.accept = accept

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        return not (self.accept is None or self.accept(record))


def _is_torchao_cuda_extension(record: logging.LogRecord) -> bool:
    """``Failed to load <file>: ...`` about a ``_C*.so`` of torchao itself, on a torch build without a GPU backend."""
    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        return False
    file = str(record.msg)[len("Failed to load "):].partition(":")[0]
    return Path(file).name.startswith("_C") and Path(file).parent.name == "torchao"


def _is_torchao_enum(record: logging.LogRecord) -> bool:
    """The pytree note about an Enum that torchao (not anyone else) registers as a constant."""
    cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return str(getattr(cls, "__module__", "")).startswith("torchao")


#: The hub kernel repository bitsandbytes asks ``kernels`` for on a CPU with AVX512-BF16 (best effort, at import).
BITSANDBYTES_CPU_KERNEL = "kernels-community/quantization-bitsandbytes"

#: (logger name, message prefix, extra condition or None) of each known import-time line.
QUANTIZER_IMPORT_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community", None),
    ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{BITSANDBYTES_CPU_KERNEL}'", None),
    ("torchao", "Failed to load ", _is_torchao_cuda_extension),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported by torch.compile", _is_torchao_enum),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects", None),
)


def silence_quantizer_import_noise() -> None:
    """Install the filters of :data:`QUANTIZER_IMPORT_NOISE` (once; call before the first ``import diffusers``)."""
    for name, prefix, accept in QUANTIZER_IMPORT_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(MessageFilter(prefix, accept))
