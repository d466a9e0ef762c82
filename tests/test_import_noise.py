"""The import-time log filters of ``diffusers_wan_ext.utils.import_noise`` drop exactly the known lines of
bitsandbytes / torchao / torch / Diffusers / kernels, and nothing else those loggers write (the package root installs
them when any of its modules is imported)."""

from __future__ import annotations

import enum
import logging

import pytest
import torch

from diffusers_wan_ext.utils.import_noise import BITSANDBYTES_CPU_KERNEL, silence_quantizer_import_noise


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def passed(name: str, msg: str, *args) -> bool:
    """Whether a WARNING ``msg % args`` on logger ``name`` reaches a handler."""
    logger, handler = logging.getLogger(name), Collect()
    logger.addHandler(handler)
    try:
        logger.warning(msg, *args)
    finally:
        logger.removeHandler(handler)
    return bool(handler.messages)


TorchaoEnum = enum.Enum("KernelPreference", "AUTO")
TorchaoEnum.__module__ = "torchao.quantization.quantize_.common.kernel_preference"
OtherEnum = enum.Enum("Mode", "A")


def test_known_lines_are_dropped_and_others_kept():
    silence_quantizer_import_noise()  # a second call adds no second filter
    assert len(logging.getLogger("torchao").filters) == 1
    kernel = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."
    assert not passed("bitsandbytes.backends.cpu.ops", kernel, "untrusted")
    assert passed("bitsandbytes.backends.cpu.ops", "some other bitsandbytes warning")
    assert not passed("kernels._internals.hf_hub", f"Skipping publisher trust check for '{BITSANDBYTES_CPU_KERNEL}' "
                                                   f"because Hugging Face Hub is in offline mode.")
    assert passed("kernels._internals.hf_hub", "Skipping publisher trust check for 'someone/else' because ...")
    pytree = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    assert not passed("torch.utils._pytree", pytree, TorchaoEnum)
    assert passed("torch.utils._pytree", pytree, OtherEnum)
    quantizer = "diffusers.quantizers.torchao.torchao_quantizer"
    assert not passed(quantizer, "Unable to import `torchao` Tensor objects. This may affect loading checkpoints")
    assert passed(quantizer, "another Diffusers torchao warning")
    assert passed("torchao", "Failed to load /x/site-packages/other/_C_ext.so: Could not load this library")
    assert passed("torchao", "Skipping import of cpp extensions due to incompatible torch version.")


@pytest.mark.skipif(torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None,
                    reason="a torch with a GPU backend keeps torchao's extension load failures visible")
def test_torchao_cuda_extensions_are_dropped_on_a_cpu_torch():
    for name in ("_C_mxfp8.cpython-310-x86_64-linux-gnu.so", "_C_cutlass_90a.abi3.so"):
        msg = f"Failed to load /venv/site-packages/torchao/{name}: Could not load this library: ..."
        assert not passed("torchao", msg)
