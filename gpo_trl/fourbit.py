"""Which kernel bitsandbytes' 4-bit layers run on, said once by the runs that load a 4-bit model, not by every import.

bitsandbytes 0.50 tries, when it is imported on a CPU with AVX512-BF16, to fetch an optional fused CPU kernel
(`kernels-community/quantization-bitsandbytes`) through the `kernels` package, which downloads it from the Hub at
runtime. Without that package (or offline) it logs "Failed to load CPU gemm_4bit_forward ..." and uses its own CPU
kernels, which work. peft imports bitsandbytes, so the line appeared on every `gpo-trl` command, `--help` included,
and read like a broken install. `hold_back_import_warning` keeps that record (for `describe_4bit_kernel`) instead of
printing it; it must run before bitsandbytes is imported (gpo_trl/__init__.py calls it first).
"""

from __future__ import annotations

import logging

_LOGGER = "bitsandbytes.backends.cpu.ops"
_held: list[str] = []


class _HoldBack(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"):
            _held.append(record.getMessage())
            from .quiet import is_verbose

            return is_verbose()  # `gpo-trl --verbose` shows it as logged
        return True


def hold_back_import_warning():
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _HoldBack) for f in logger.filters):
        logger.addFilter(_HoldBack())


def describe_4bit_kernel(device_type: str) -> str:
    """One line for a run that loads a 4-bit model: which bitsandbytes kernels its 4-bit layers use."""
    if device_type != "cpu":
        return f"4-bit layers: bitsandbytes {device_type.upper()} kernels."
    from bitsandbytes.backends.cpu import ops

    if getattr(ops, "gemm_4bit_forward_kernel", None) is not None:
        return ("4-bit layers: bitsandbytes CPU kernels, with the fused Hub kernel "
                "kernels-community/quantization-bitsandbytes.")
    reason = f" (not loaded: {_held[-1].split(': ', 1)[-1].split('. Please')[0]})" if _held else ""
    return ("4-bit layers: bitsandbytes' built-in CPU kernels (dequantize + matmul). The optional fused kernel "
            f"kernels-community/quantization-bitsandbytes is not used{reason}; it needs `pip install kernels` and "
            "network access to the Hub at run time.")
