"""Run by test_refcache.py under `accelerate launch` with 2 processes (DDP over gloo on the CPU): build the same
trainer twice with precomputed reference log-probs, in a setup where the ranks would disagree about the cache, and
print what every rank did as one JSON line (from rank 0).

    keys: every rank computes a different model hash (as ZeRO-3's shards give), one shared cache directory.
    dirs: one model hash, but each rank has its own `ref_logps_cache_dir` (as the default, in a node-local datasets
          cache, gives on several nodes).
"""

import json
import sys
from datetime import timedelta

import trl.trainer.dpo_trainer as dpo
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import load_dataset
from peft import LoraConfig

from conftest import DATA, cpu_args
from gpo_trl import GPOConfig, GPOTrainer

mode, model, tmp = sys.argv[1:]
# One gloo group over both processes, as `use_cpu: true` gives; a collective that one rank enters alone fails
# after 60 s instead of waiting for the default 30 minutes (TrainingArguments passes no ddp_timeout on the CPU)
state = PartialState(cpu=True, timeout=timedelta(seconds=60))
assert state.num_processes == 2, state
rank = state.process_index
if mode == "keys":
    rank_zero_hash = dpo.hash_module
    dpo.hash_module = lambda module: f"{rank_zero_hash(module)}-rank{rank}"  # where TRL's __init__ hashes the model
cache_dir = f"{tmp}/cache" if mode == "keys" else f"{tmp}/cache-rank{rank}"

passes = []
compute = GPOTrainer.compute_ref_log_probs
GPOTrainer.compute_ref_log_probs = lambda self, *args: passes.append(1) or compute(self, *args)

with state.main_process_first():  # a datasets cache all ranks see: TRL's own precompute reads its file on every rank
    dataset = load_dataset("json", data_files=str(DATA / "zen_standard_preference" / "train.jsonl"), split="train[:8]",
                           cache_dir=f"{tmp}/hf")
lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
runs = []
for run in range(2):
    passes.clear()
    args = GPOConfig(output_dir=f"{tmp}/out", precompute_ref_log_probs=True, ref_logps_cache_dir=cache_dir,
                     **cpu_args(per_device_train_batch_size=2))
    trainer = GPOTrainer(model=model, args=args, train_dataset=dataset, peft_config=lora)
    runs.append({"passes": len(passes), "ref_chosen_logps": list(trainer.train_dataset["ref_chosen_logps"])})
everything = gather_object([{"rank": rank, "runs": runs}])
if state.is_main_process:
    print("RANKS " + json.dumps(everything), flush=True)
