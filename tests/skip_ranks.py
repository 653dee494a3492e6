"""Run by test_reliability.py under `accelerate launch` with 2 processes (DDP over gloo on the CPU): `on_nonfinite:
skip`, AdamW with weight decay, and the loss NaN at step 2 on rank 1 only. Prints, from rank 0, one JSON line with
what every rank saw: whether step 2 left weights, optimizer state and LR schedule bit-identical, and the weights."""

import json
import sys
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from peft import LoraConfig

import test_reliability
from conftest import DATA, cpu_args, read_jsonl
from gpo_trl import GPOConfig, GPOTrainer

model, tmp = sys.argv[1:]
state = PartialState(cpu=True, timeout=timedelta(seconds=60))  # one gloo group; a stray collective fails in 60 s
assert state.num_processes == 2, state
test_reliability.EXACT.update(calls=0, poisoned={1} if state.process_index == 1 else set(), gradient_only=False)

snapshots = test_reliability.Snapshots()
args = GPOConfig(output_dir=f"{tmp}/out", gpo_loss="test_reliability:exactly_poisoned", on_nonfinite="skip",
                 **cpu_args(max_steps=3, optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="linear",
                            per_device_train_batch_size=2))
lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = GPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(
    read_jsonl(DATA / "zen_standard_preference" / "train.jsonl")[:4]), peft_config=lora, callbacks=[snapshots])
trainer.train()
(weights_1, moments_1, schedule_1), (weights_2, moments_2, schedule_2), (weights_3, _, _) = snapshots.steps


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


report = {"rank": state.process_index, "weights_kept": same(weights_1, weights_2),
          "optimizer_kept": same(moments_1, moments_2), "schedule_kept": schedule_1 == schedule_2,
          "step_3_updated": not same(weights_2, weights_3),
          "weights": {name: tensor.flatten()[:4].tolist() for name, tensor in weights_3.items()}}
everything = gather_object([report])
if state.is_main_process:
    print("RANKS " + json.dumps(everything), flush=True)
