"""Which kernel bitsandbytes' 4-bit layers run on: said once by the runs that load a 4-bit model, not by every import,
and kept the same for every pass of a training run (`keep_4bit_layers_differentiable`).

bitsandbytes 0.50 tries, when it is imported on a CPU with AVX512-BF16, to fetch an optional fused CPU kernel
(`kernels-community/quantization-bitsandbytes`) through the `kernels` package, which downloads it from the Hub at
runtime. Without that package (or offline) it logs "Failed to load CPU gemm_4bit_forward ..." and uses its own CPU
kernels, which work. peft imports bitsandbytes, so the line appeared on every `gpo-trl` command, `--help` included,
and read like a broken install. `hold_back_import_warning` keeps that record (for `describe_4bit_kernel`) instead of
printing it; it must run before bitsandbytes is imported (gpo_trl/__init__.py calls it first). transformers 5.25
requires `kernels`, so the attempt now always runs: offline, `kernels` first logs "Skipping publisher trust check for
'kernels-community/...'" before the load fails, and that line is held back too.
"""

from __future__ import annotations

import logging

# logger -> the start of the message it logs about the optional kernel
_HELD_BACK = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/",
}
_held: list[str] = []


class _HoldBack(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.prefix):
            _held.append(record.getMessage())
            from .quiet import is_verbose

            return is_verbose()  # `gpo-trl --verbose` shows it as logged
        return True


def hold_back_import_warning():
    for name, prefix in _HELD_BACK.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HoldBack) for f in logger.filters):
            logger.addFilter(_HoldBack(prefix))


def describe_4bit_kernel(device_type: str) -> str:
    """One line for a run that loads a 4-bit model: which bitsandbytes kernels its 4-bit layers use."""
    if device_type != "cpu":
        return f"4-bit layers: bitsandbytes {device_type.upper()} kernels."
    from bitsandbytes.backends.cpu import ops

    if getattr(ops, "gemm_4bit_forward_kernel", None) is not None:
        return ("4-bit layers: bitsandbytes CPU kernels, with the fused Hub kernel "
                "kernels-community/quantization-bitsandbytes.")
    failures = [message for message in _held if message.startswith("Failed to load")]
    reason = f" (not loaded: {failures[-1].split(': ', 1)[-1].split('. Please')[0]})" if failures else ""
    return ("4-bit layers: bitsandbytes' built-in CPU kernels (dequantize + matmul). The optional fused kernel "
            f"kernels-community/quantization-bitsandbytes is not used{reason}; it needs `pip install kernels` and "
            "network access to the Hub at run time.")


def keep_4bit_layers_differentiable(*models) -> None:
    """Keep bitsandbytes from switching the 4-bit layers of a model being trained to its CPU inference kernel.

    bitsandbytes 0.50's `Linear4bit.forward`, on a CPU with AVX512-BF16, repacks the layer's weight in place the first
    time the layer runs in eval mode without gradients (TRL's reference precompute, an evaluation, a generation).
    From then on every forward of that layer, training ones included, goes through `bitsandbytes::gemv_4bit`, which
    computes in bfloat16 whatever `bnb_4bit_compute_dtype` says (outputs ~3e-3 relative off the float32 product) and
    has no autograd formula: the gradient through the frozen base weight to the layer's input is silently dropped
    (PyTorch only warns "an autograd kernel was not registered"), so the LoRA gradients below it are wrong (measured:
    92% median relative error on a 2-layer Llama after `precompute_ref_log_probs`). The repack is gated by the
    per-layer flag `support_avx512bf16_for_cpu`; clearing it keeps every pass of the run, the reference's included,
    on the dequantize + matmul path with its autograd. A layer that was already repacked cannot be trusted to train.
    """
    for model in models:
        for name, module in model.named_modules() if model is not None else ():
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                continue
            module.support_avx512bf16_for_cpu = False
            if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
                raise ValueError(
                    f"The 4-bit layer {name} was already converted by bitsandbytes to its CPU inference format (the "
                    "model ran in eval mode without gradients before training), which computes in bfloat16 and "
                    "passes no gradient back through the layer. Load the model afresh for training.")
