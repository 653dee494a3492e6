"""Part `losses`: what GPO's step costs against TRL's, for every built-in loss, on the whole training step.

Per setting (`--settings`: full, lora, full+precompute, lora+precompute), ONE GPOTrainer instance runs TRL's DPO code
path (`loss_type="sigmoid"`), GPO's with every loss in `--losses`, and the floor (one forward+backward of the policy
alone on the same padded batch: fused LM head, no reference pass, no loss), so they share the model weights in memory,
the optimizer and the batches and nothing but the code differs. A separate DPOTrainer instance ("TRL DPOTrainer, own
model") runs alongside to show how much separate instances of one model differ in speed here. Reported per contender
(timing.py): median step time, tokens/s, padding, the medians of per-step ratios to TRL (wall and CPU time, tokens/s),
peak memory, and `vs_floor`, the median per-step ratio to the floor.
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path

from .contender import Contender
from .timing import print_table, race, summarise
from .workload import make_trainer


def part_losses(model_path: Path, dataset, args, tmp: Path) -> list[dict]:
    """Per setting, one GPOTrainer instance runs TRL's code path, GPO's with every loss, and the floor, so they share
    the model weights in memory, the optimizer and the batches; a separate DPOTrainer instance runs alongside."""
    results = []
    for setting in args.settings:
        lora, precompute = "lora" in setting, "precompute" in setting
        shared = make_trainer("gpo", model_path, dataset, args, lora, precompute, tmp)
        trl = Contender("TRL DPO (sigmoid)", shared, kind="trl")
        own = Contender("TRL DPOTrainer, own model", make_trainer("trl", model_path, dataset, args, lora, precompute,
                                                                  tmp), kind="trl")
        floor = Contender("floor (policy fwd+bwd)", shared, kind="floor")
        gpo = [Contender(f"GPO {loss}", shared, loss=loss) for loss in args.losses]
        contenders = [trl, *gpo, own, floor]
        race(contenders, args)
        rows = summarise(contenders, trl, args, part="losses", setting=setting)
        for row, contender in zip(rows, contenders):
            row["vs_floor"] = statistics.median([t / f for t, f in zip(contender.times, floor.times)])
        results += rows
        print_table(rows, f"setting: {setting} (floor {rows[-1]['step_time_s']:.3f} s)")
        del shared, trl, own, floor, gpo, contenders
        gc.collect()
    return results

