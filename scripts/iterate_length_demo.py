"""Measure `gpo-trl iterate` with a length judge on the CPU, and score the rounds with `evaluate --compare`.

    python scripts/iterate_length_demo.py --out runs/iterate-length --seeds 0 1 2 --record docs/iterate_length_judge.json

A tiny Llama (random init, tokenizer trained on the demo texts) is first trained for 150 causal-LM steps on the demo's
prompt + answer texts, so it samples varied answers of 1-25 words that end with EOS. Then, per seed, `rounds` rounds
of iterative GPO (logistic, LoRA) on the 32 training prompts with the judge {aux: length, weight: -1} (shorter is
better), and `evaluate --compare` of every round's policy on the 8 held-out topics. The record holds every round's row
and every evaluation summary; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from gpo_trl.demo import make_demo_pairs, save_talking_model, save_tiny_model
from gpo_trl.generate_eval import evaluate_generation, format_table, load_settings
from gpo_trl.iterate import load_plan, run_iterate

RECIPE = dict(gpo_loss="logistic", beta=0.1, use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
              lora_target_modules="all-linear", output_dir="unused", num_train_epochs=3,
              per_device_train_batch_size=8, learning_rate=5.0e-3, max_length=96, use_cpu=True, bf16=False,
              activation_checkpointing=False, logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none",
              dataloader_num_workers=0, disable_tqdm=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/iterate-length")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", help="write the measured rows and summaries to this JSON file")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_demo_pairs(seed=0)
    texts = [r["prompt"] + r[side] for r in splits["train"] for side in ("chosen", "rejected")]
    if not (out / "talking" / "config.json").is_file():
        all_texts = [r[k] for rows in splits.values() for r in rows for k in ("prompt", "chosen", "rejected")]
        save_tiny_model(out / "tiny", "llama", all_texts, seed=0)
        save_talking_model(out / "talking", out / "tiny", texts)
    prompts = list(dict.fromkeys(r["prompt"] for r in splits["train"]))
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (out / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits["test"]))
    generate = out / "generate.yaml"
    generate.write_text(yaml.safe_dump({
        "model": str(out / "talking"), "prompts": {"data_files": str(out / "held_out.jsonl")},
        "samples_per_prompt": 4, "generation": {"max_new_tokens": 40}, "judge": {"aux": "length", "weight": -1}}))
    record = {"rounds": {}, "evaluations": {}}
    for seed in args.seeds:
        root = out / f"seed{seed}"
        root.mkdir(exist_ok=True)
        (root / "base.yaml").write_text(yaml.safe_dump({**RECIPE, "seed": seed, "model_name_or_path": str(out / "talking")}))
        (root / "rounds.yaml").write_text(yaml.safe_dump({
            "base": "base.yaml", "output_dir": str(root / "out"), "prompts": {"data_files": str(out / "prompts.jsonl")},
            "rounds": args.rounds, "samples_per_prompt": 4, "generation": {"max_new_tokens": 40, "batch_size": 32},
            "judge": {"aux": "length", "weight": -1}, "pairing": "best_vs_worst", "reference": "initial",
            "seed": seed}))
        rows = run_iterate(load_plan(str(root / "rounds.yaml")))
        record["rounds"][seed] = rows
        settings = load_settings(str(generate))
        summaries = [evaluate_generation(row["policy"], settings) for row in rows]
        record["evaluations"][seed] = summaries
        print(format_table(summaries), flush=True)
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
