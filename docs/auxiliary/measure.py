"""The auxiliary objective's designer effect on the tiny model: the protocol of tests/test_auxiliary.py's slow test
(full fine-tuning, 100 steps, batch 16, lr 2e-3, seed 0; 8 samples per held-out prompt at temperature 1, <= 48
tokens), over more runs than the test affords: opposite-sign controls and the variants the README compares.

    PYTHONPATH=. python docs/auxiliary/measure.py | grep '^{"run"' > docs/auxiliary/measured.jsonl
    # the earlier softmax-weighted likelihood form, from the commit before it was replaced:
    mkdir /tmp/old && git archive 4b11b3e gpo_trl | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python docs/auxiliary/measure.py old | grep '^{"run"' >> docs/auxiliary/measured.jsonl
    # the test's three runs under other seeds (training order and sampling; the tiny model stays seed 0):
    PYTHONPATH=. python docs/auxiliary/measure.py seed 1 | grep '^{"run"' >> docs/auxiliary/measured.jsonl

Prints (among the trainer's logs) one JSON line per run: mean sampled length (tokens), mean Flesch reading ease of
the samples, held-out preference accuracy (eval_rewards/accuracies), seconds.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from gpo_trl import GPOConfig, GPOTrainer, auxiliary  # noqa: E402
from gpo_trl.demo import make_demo_pairs, save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from test_auxiliary import sample  # noqa: E402  (the test's own sampler: same protocol, one copy)

PENALTY, BONUS = [{"name": "length", "weight": -1.0}], [{"name": "length", "weight": 1.0}]
EASY, HARD = [{"name": "readability", "weight": 1.0}], [{"name": "readability", "weight": -1.0}]
RUNS = {  # name: (variant, aux settings)
    "plain": ("anchored", {}),
    "length_penalty": ("anchored", dict(aux_coef=0.75, aux_temperature=5.0, aux_rewards=PENALTY)),
    "length_bonus (control)": ("anchored", dict(aux_coef=0.75, aux_temperature=5.0, aux_rewards=BONUS)),
    "readability": ("anchored", dict(aux_coef=1.0, aux_temperature=10.0, aux_rewards=EASY)),
    "readability_negated (control)": ("anchored", dict(aux_coef=1.0, aux_temperature=10.0, aux_rewards=HARD)),
    "signed length_penalty": ("signed", dict(aux_coef=0.75, aux_temperature=5.0, aux_rewards=PENALTY)),
    "signed readability": ("signed", dict(aux_coef=1.0, aux_temperature=5.0, aux_rewards=EASY)),
}
OLD_RUNS = {  # the softmax form's own settings (its old test: alpha 1, tau 1)
    "old plain": ("old", {}),
    "old zero-weight reward": ("old", dict(aux_coef=1.0, aux_rewards=[{"name": "length", "weight": 0.0}])),
    "old length_penalty": ("old", dict(aux_coef=1.0, aux_rewards=PENALTY)),
    "old readability": ("old", dict(aux_coef=1.0, aux_temperature=10.0, aux_rewards=EASY)),
}


def signed_aux_loss(loss_fn, scaled_logratios, advantages, temperature):
    """The signed variant: also pushes the worse-scored response's log-ratio down."""
    weights = torch.tanh(advantages.to(scaled_logratios.dtype) / temperature)
    per_response = weights.abs() * loss_fn(torch.sign(weights) * scaled_logratios)
    chosen, rejected = per_response.chunk(2)
    return chosen + rejected


def tiny_model(root: Path, rows) -> Path:
    """The tests' tiny llama (tests/conftest.py: tokenizer trained on the zen sample, then the demo pairs)."""
    zen = REPO / "tests" / "data" / "zen_standard_preference" / "train.jsonl"
    texts = [json.loads(line)[k] for line in zen.read_text().splitlines() if line.strip()
             for k in ("prompt", "chosen", "rejected")]
    texts += [r[k] for split in rows.values() for r in split for k in ("prompt", "chosen", "rejected")]
    return save_tiny_model(root / "llama", "llama", texts, seed=0)


def main(runs, seed=0):
    rows = make_demo_pairs(seed=0)
    train, test = Dataset.from_list(rows["train"]), Dataset.from_list(rows["test"])
    prompts = sorted(set(test["prompt"]))
    anchored = getattr(auxiliary, "aux_loss", None)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp), rows)
        tokenizer = AutoTokenizer.from_pretrained(model)
        for name, (variant, kwargs) in runs.items():
            auxiliary.aux_loss = signed_aux_loss if variant == "signed" else anchored
            start = time.time()
            args = GPOConfig(output_dir=f"{tmp}/{len(name)}", use_cpu=True, bf16=False, report_to=[], seed=seed,
                             save_strategy="no", logging_steps=50, max_length=64, disable_tqdm=True, max_steps=100,
                             per_device_train_batch_size=16, learning_rate=2e-3, dataloader_num_workers=0, **kwargs)
            trainer = GPOTrainer(model=str(model), args=args, train_dataset=train, eval_dataset=test)
            trainer.train()
            accuracy = trainer.evaluate()["eval_rewards/accuracies"]
            length, flesch = sample(trainer, tokenizer, prompts, seed=seed)
            print(json.dumps({"run": name, "variant": variant, **{k: v for k, v in kwargs.items()}, "seed": seed,
                              "sample_tokens": round(length, 2), "sample_flesch": round(flesch, 2),
                              "heldout_accuracy": accuracy, "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["seed"]:  # `seed N`: the test's three runs again, training and sampling under seed N
        main({name: RUNS[name] for name in ("plain", "length_penalty", "readability")}, seed=int(sys.argv[2]))
    else:
        main(OLD_RUNS if sys.argv[1:] == ["old"] else RUNS)
