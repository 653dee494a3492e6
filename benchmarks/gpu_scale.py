"""Realistic scale, for a GPU: the model shapes, the defaults that follow from `--device` and `--scale`, and the
markdown report of a run (`--markdown`).

    python scripts/benchmark.py --device cuda --scale qwen2.5-0.5b --markdown docs/benchmark-gpu.md

`--scale qwen2.5-0.5b` (or `qwen2.5-1.5b`) builds the model from that model's config shape with random weights
(nothing is downloaded), its real 151936-row LM head, a byte-level BPE trained on the hh-rlhf sample
(`--tokenizer_corpus`, default: the 300-row hh-rlhf sample in tests/data; target `--vocab_size` 32000, the
size reached is reported), batch 8, max_length 1024, bfloat16, and the `layouts` part (layouts.py) for LoRA and full
fine-tuning; an explicit command-line value always wins. `toy` is the CPU benchmark's shape. `--markdown FILE` writes
the layout tables with the device, the versions (`environment`, also in the JSON) and the exact command.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import torch
from transformers.utils import is_flash_attn_2_available

from . import REPO

# The hh-rlhf sample the repository ships (300 rows), the realistic tokenizer's default training text
DEFAULT_CORPUS = REPO / "tests" / "data" / "hh_rlhf_harmless_base_head300.jsonl"
# Model shapes (from the public configs of these models; random weights). `toy` is the CPU benchmark's.
SCALES = {
    "toy": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def resolve_defaults(args, argv: list[str], parser):
    """Defaults that depend on the device and the scale; an explicit command-line value always wins."""
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU build of torch)")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a machine with CUDA: hide the GPUs with CUDA_VISIBLE_DEVICES= instead")
    realistic = args.scale != "toy"
    if realistic:
        for key, value in {"--batch": 8, "--max_length": 1024, "--parts": ["layouts"]}.items():
            if key not in given:
                setattr(args, key[2:], value)
        if args.tokenizer_corpus is None:
            args.tokenizer_corpus = str(DEFAULT_CORPUS)
    args.dtype = args.dtype or ("bfloat16" if realistic else "float32")
    args.vocab_size = args.vocab_size or (32000 if realistic else 1024)
    args.layout_settings = args.layout_settings or (["lora", "full"] if realistic else ["lora"])
    if args.dtype == "bfloat16" and args.device == "cpu":
        parser.error("--dtype bfloat16 is for the GPU; the CPU benchmark runs float32")


def environment() -> dict:
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")}
    if is_flash_attn_2_available():
        versions["flash-attn"] = importlib.metadata.version("flash_attn")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    return {"device": device, "cuda": torch.version.cuda, "python": platform.python_version(), **versions}


def write_markdown(path: str, results: list[dict], args, argv: list[str]):
    """The layout tables as markdown, with the device, the versions, the model and the exact command."""
    env = environment()
    info = args.model_info
    lines = [f"# GPO batch layouts on {env['device']}", "",
             f"Command: `python scripts/benchmark.py {' '.join(argv)}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), "",
             f"Model: `{info['scale']}` shape, random weights, {info['parameters'] / 1e6:.0f}M parameters, LM head "
             f"{info['model_vocab']} rows; tokenizer: byte-level BPE with {info['tokenizer_vocab']} tokens; "
             f"{args.dtype}; batch {args.batch}, max_length {args.max_length}; {args.steps} measured steps after "
             f"{args.warmup} warm-up; ratios are medians of per-step ratios to TRL on the same batch (tokens/s of the "
             "length-grouped run: totals, its batches differ). Peak memory: torch.cuda.max_memory_allocated over two "
             "steps above what was allocated before (on the CPU: RSS increase).", ""]
    for setting in args.layout_settings:
        rows = [r for r in results if r["part"] == "layouts" and r["setting"] == setting]
        if not rows:
            continue
        lines += [f"## {setting}", "", "| layout | attention | padding | step s | step / TRL | tokens/s | tokens/s / TRL "
                  "| peak MiB | memory / TRL |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            memory_cells = (f"{r['peak_memory_mb']:.0f} | {r.get('memory_ratio', float('nan')):.3f}"
                            if r["peak_memory_mb"] is not None else "- | -")
            lines.append(f"| {r['name']} | {r['attention']} | {r['padding_fraction']:.0%} | {r['step_time_s']:.3f} | "
                         f"{r['step_time_ratio']:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_ratio']:.2f}x | "
                         f"{memory_cells} |")
        lines.append("")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))

