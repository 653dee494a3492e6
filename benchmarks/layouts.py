"""Part `layouts`: TRL's padded DPO against GPO (logistic) in every batch layout and attention kernel that runs here.

Per setting (`--layout_settings`: LoRA by default, LoRA and full fine-tuning at a realistic scale), at the same batch
size and max_length, on ONE trainer instance: TRL padded, GPO padded, length-grouped (transformers'
LengthGroupedSampler), packed (`padding_free`), prefix-shared (dense mask) and packed + prefix-shared, all under sdpa;
on a GPU also packed under flash-attention (bfloat16, when flash_attn is installed) and packed + prefix-shared under
FlexAttention (CUDA only: FlexAttention has no CPU backward). The kernels are switched in place before each step (same
weights). tokens/s credits every layout with the same real tokens (TRL's count), so the ratio is the speed-up;
`padding_fraction` is the share of the batch's cells that hold no real token (a shared prompt counts once), and
`prompt_token_share` the prompt's share of the real tokens, which bounds what prefix sharing can save.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from transformers.utils import is_flash_attn_2_available

from gpo_trl.packing import PackedPreferenceCollator

from .contender import Contender, set_attention
from .timing import batches, print_table, race, summarise
from .workload import make_trainer


def part_layouts(model_path: Path, dataset, args, tmp: Path) -> list[dict]:
    """TRL's padded DPO against GPO (logistic) in every batch layout and attention kernel that runs here, per setting
    (LoRA, full fine-tuning), all on one trainer instance (the kernels are switched in place, same weights)."""
    results = []
    for setting in args.layout_settings:
        trainer = make_trainer("gpo", model_path, dataset, args, setting == "lora", False, tmp)
        trainer._attn_implementation = trainer.model.config._attn_implementation
        contenders = layout_contenders(trainer, args)
        race(contenders, args)
        rows = summarise(contenders, contenders[0], args, part="layouts", setting=setting)
        prompt_share = prompt_token_share(trainer, batches(trainer.train_dataset, args, grouped=False)[args.warmup:])
        for row, contender in zip(rows, contenders):
            row["prompt_token_share"] = prompt_share
            row["attention"] = contender.attention or "sdpa"
        print_table(rows, f"batch layouts, {setting} (prompt tokens are {prompt_share:.0%} of the real tokens)")
        results += rows
        set_attention(trainer, "sdpa")
        del trainer, contenders
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def layout_contenders(trainer, args) -> list[Contender]:
    padded = trainer._padded_collator
    pad = trainer._tokenizer.pad_token_id

    def packed(**layout):
        return PackedPreferenceCollator(padded, pad_token_id=pad, row_length=args.max_length, **layout)

    gpo = dict(trainer=trainer, loss="logistic")
    contenders = [Contender("TRL DPO padded", trainer, kind="trl", collator=padded),
                  Contender("GPO padded", collator=padded, **gpo),
                  Contender("GPO length-grouped", collator=padded, grouped=True, **gpo),
                  Contender("GPO packed", collator=packed(padding_free=True), **gpo),
                  Contender("GPO prefix-shared", collator=packed(padding_free=False, prefix_sharing=True), **gpo),
                  Contender("GPO packed+prefix-shared", collator=packed(padding_free=True, prefix_sharing=True), **gpo)]
    if args.device != "cpu" and args.dtype != "float32" and is_flash_attn_2_available():
        contenders.append(Contender("GPO packed, flash-attention", collator=packed(padding_free=True),
                                    attention="flash_attention_2", **gpo))
    if args.device != "cpu":  # FlexAttention has no CPU backward
        contenders.append(Contender("GPO packed+prefix-shared, flex", attention="flex_attention", collator=packed(
            padding_free=True, prefix_sharing=True, block_mask=True), **gpo))
    else:
        print("(CPU: the FlexAttention layout is left out, FlexAttention has no CPU backward; flash-attention needs CUDA)")
    for contender in contenders:  # the kernels are switched before each step: the others run under sdpa
        contender.attention = contender.attention or "sdpa"
    return contenders


def prompt_token_share(trainer, index_batches) -> float:
    """Share of the pairs' real tokens (as TRL counts them) that are prompt tokens."""
    prompt = total = 0
    for indices in index_batches:
        batch = trainer._padded_collator([trainer.train_dataset[i] for i in indices])
        real = batch["attention_mask"].sum().item()
        prompt += real - batch["completion_mask"].sum().item()
        total += real
    return prompt / total

