"""The model, tokenizer and trainers every part measures.

`build_model` writes a random-init model of `--scale`'s shape (gpu_scale.SCALES; nothing is downloaded) with a
byte-level BPE trained on `tokenizer_texts` (the benchmark rows, or `--tokenizer_corpus`), and records its size in
`args.model_info`. `make_trainer` builds TRL's DPOTrainer (`loss_type="sigmoid"`) or GPOTrainer on it with the settings
every comparison shares (batch, max_length, dtype, sdpa, seed, no checkpoints, no gradient checkpointing), LoRA
(r 16, all linear layers) or full fine-tuning, with or without precomputed reference log-probs.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from gpo_trl import GPOConfig, GPOTrainer
from gpo_trl.demo import build_tokenizer

from . import REPO
from .gpu_scale import SCALES

DEFAULT_DATA = REPO / "tests" / "data" / "hh_rlhf_harmless_base_head300.jsonl"


def build_model(path: Path, texts: list[str], args) -> Path:
    """A random-init model of `args.scale`'s shape and a BPE tokenizer trained on `texts`, saved to `path`."""
    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size)
    shape = dict(SCALES[args.scale])
    shape.setdefault("vocab_size", len(tokenizer))  # realistic scales keep their real LM head (more rows than used)
    config = AutoConfig.for_model(shape.pop("model_type"), eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    args.model_info = {"scale": args.scale, "parameters": sum(p.numel() for p in model.parameters()),
                       "model_vocab": config.vocab_size, "tokenizer_vocab": len(tokenizer)}
    return path


def tokenizer_texts(dataset, args) -> list[str]:
    """The tokenizer's training text: `--tokenizer_corpus` (hh-rlhf JSONL, gzipped or not), else the benchmark rows."""
    if not args.tokenizer_corpus:
        return [row[k] for row in dataset for k in ("prompt", "chosen", "rejected")]
    opener = gzip.open if args.tokenizer_corpus.endswith(".gz") else open
    with opener(args.tokenizer_corpus, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [row[k] for row in rows for k in ("chosen", "rejected")]


def make_trainer(kind: str, model_path: Path, dataset, args, lora: bool, precompute: bool, out: Path,
                 loss: str = "logistic", **layout):
    common = dict(output_dir=str(out), use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
                  model_init_kwargs={"dtype": args.dtype, "attn_implementation": "sdpa"},
                  activation_checkpointing=False, report_to=[], seed=args.seed, save_strategy="no", logging_steps=1,
                  per_device_train_batch_size=args.batch, max_length=args.max_length, learning_rate=1e-5,
                  precompute_ref_log_probs=precompute, dataloader_num_workers=0, disable_tqdm=True)
    if kind == "trl":
        trainer_cls, config = DPOTrainer, DPOConfig(loss_type="sigmoid", **common)
    else:
        trainer_cls, config = GPOTrainer, GPOConfig(gpo_loss=loss, **common, **layout)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    return trainer_cls(model=str(model_path), args=config, train_dataset=dataset, peft_config=peft)

