"""Part `overhead`: the milliseconds GPO's code adds around the model per step, against TRL's, measured in isolation.

Whole-step timing cannot resolve milliseconds on a shared CPU, so this part times only the code that differs: on a
full fine-tuning trainer with precomputed reference log-probs, one real batch goes through the policy once (fused LM
head) and its outputs are recorded; then TRL's `_compute_loss` and GPO's, with each loss in `--losses`, are replayed
on those outputs (`Replay` stands in for the model) with their backward, 200 times each (median), plus GPO's gradient
finiteness check (`gpo_trl.guards.all_finite`) on the real gradients of that step. Reported per path: the loss path,
the gradient check, the extra milliseconds against TRL and their share of one policy forward+backward of the batch.
"""

from __future__ import annotations

import statistics
import time
import types
from pathlib import Path

import torch
from trl import DPOTrainer

from gpo_trl import get_loss
from gpo_trl.guards import all_finite

from .contender import Contender
from .workload import make_trainer


class Replay(torch.nn.Module):
    """Stands in for the model and returns recorded fused-head outputs: what is left to time is the code around the
    forward (loss, metrics, their backward), which is all that differs between TRL's step and GPO's."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, *args, **kwargs):
        return self.outputs


def part_overhead(model_path: Path, dataset, args, tmp: Path, repeats: int = 200) -> list[dict]:
    """The per-step cost of GPO's code outside the model, against TRL's, measured in isolation (milliseconds are
    below what whole-step timing can resolve on this machine): each loss path replayed on recorded outputs of a
    real batch, plus GPO's gradient finiteness check on the real gradients of a full fine-tuning step."""
    trainer = make_trainer("gpo", model_path, dataset, args, False, True, tmp)
    Contender("setup", trainer)  # optimizer and accumulation state, as in the other parts
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)]))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    start = time.perf_counter()
    outputs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            use_cache=False, fused_lm_head=True)
    outputs.log_probs.sum().backward()
    model_step = time.perf_counter() - start
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    outputs = type(outputs)(**{k: (v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v)
                               for k, v in outputs.items()})
    replay = Replay(outputs)

    def loss_path(run) -> float:
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            run(replay, batch, False).backward()
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    trl_ms = 1e3 * loss_path(types.MethodType(DPOTrainer._compute_loss, trainer))
    rows = [{"part": "overhead", "name": "TRL DPO (sigmoid)", "loss_path_ms": trl_ms}]
    for loss in args.losses:
        trainer.gpo_loss = get_loss(loss)
        rows.append({"part": "overhead", "name": f"GPO {loss}", "loss_path_ms": 1e3 * loss_path(trainer._compute_loss)})
    check = []
    for _ in range(repeats // 4):
        begin = time.perf_counter()
        all_finite(trainer.accelerator, [torch.stack(torch._foreach_norm(grads))])
        check.append(time.perf_counter() - begin)
    check_ms = 1e3 * statistics.median(check)
    print(f"\noverhead: the code around the model per step (full fine-tuning, batch {args.batch}, precomputed reference; "
          f"one policy forward+backward of this batch takes {1e3 * model_step:.0f} ms)")
    for row in rows:
        row["gradient_check_ms"] = check_ms if row["name"].startswith("GPO") else 0.0
        row["extra_ms_vs_trl"] = row["loss_path_ms"] + row["gradient_check_ms"] - trl_ms
        row["extra_share_of_model_step"] = row["extra_ms_vs_trl"] / (1e3 * model_step)
        print(f"{row['name']:<26} loss path {row['loss_path_ms']:6.2f} ms  + gradient check {row['gradient_check_ms']:5.2f} ms"
              f"  = {row['extra_ms_vs_trl']:+6.2f} ms vs TRL ({row['extra_share_of_model_step']:+.2%} of the model step)")
    return rows

