"""Offline, deterministic assets for the demo and the tests: a tiny causal LM, its tokenizer, a preference dataset.

Nothing here touches the network. The model is randomly initialised from a config (Llama, Qwen2 or GPT-2 shape),
the tokenizer is a byte-level BPE trained with the `tokenizers` library on the data it will see, and the
preference pairs are generated from templates with a fixed seed. Everything is written with `save_pretrained` /
JSON lines, so training loads it through the same `from_pretrained` / `load_dataset` calls as a Hub model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .atomic import write_text_atomic

EOS, PAD = "<|endoftext|>", "<|pad|>"
# A minimal chat template so conversational datasets work with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCHITECTURES = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (never an unknown token), with EOS, PAD and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, bos_token=EOS)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(architecture: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A randomly initialised tiny causal LM of the given architecture, sized to the tokenizer."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose from {sorted(ARCHITECTURES)}.")
    kwargs = dict(ARCHITECTURES[architecture])
    config = AutoConfig.for_model(
        kwargs.pop("model_type"), vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **kwargs
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny_model(path: str | Path, architecture: str, texts: list[str], seed: int = 0) -> Path:
    """Build a tokenizer on `texts` and a tiny model, and save both to `path` (a from_pretrained directory)."""
    path = Path(path)
    tokenizer = build_tokenizer(texts)
    model = build_tiny_model(architecture, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_talking_model(path: str | Path, start: str | Path, texts: list[str], steps: int = 150, seed: int = 0) -> Path:
    """A tiny model that samples varied text: `start` (e.g. from save_tiny_model) after `steps` causal-LM steps on
    `texts` + EOS (batch 16, AdamW 3e-3). Used where generation is tested (`gpo-trl iterate`, `evaluate --generate`):
    a random-init model only samples noise of the maximal length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start)
    documents = [text + tokenizer.eos_token for text in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(steps):
        encoded = tokenizer(rng.sample(documents, 16), return_tensors="pt", padding=True)
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        model(**encoded, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


# --- The demo's preference task ---------------------------------------------------------------------------------
# An assistant should answer "how do I X?" helpfully rather than dismissively. Chosen and rejected completions are
# drawn from two phrase pools, so a tiny model can learn the preference and the held-out topics test that it
# generalises beyond the topics it saw.

_TOPICS = [
    "bake bread", "fix a bike", "learn python", "plant tomatoes", "write a poem", "train for a race", "paint a wall",
    "brew coffee", "tune a guitar", "clean a laptop", "save money", "sleep better", "learn chess", "make soup",
    "fold a shirt", "wash a car", "start a blog", "build a shelf", "read faster", "cook rice", "knit a scarf",
    "grow basil", "change a tire", "study maths", "draw a cat", "pack a bag", "plan a trip", "bake cookies",
    "speak french", "swim faster", "sew a button", "prune a rose", "edit a video", "write a letter", "walk a dog",
    "learn piano", "clean windows", "make tea", "run a meeting", "fix a leak",
]
_HELPFUL_OPENERS = ["Sure, here is how:", "Happy to help:", "Good question:", "Here are the steps:", "Gladly:"]
_HELPFUL_STEPS = [
    "first gather what you need,", "start with a small step,", "follow a simple plan,", "take your time,",
    "check each step carefully,", "practice a little every day,", "ask a friend to help,", "keep notes as you go,",
]
_HELPFUL_CLOSERS = ["and you will get it right.", "and enjoy the result.", "then review how it went.", "good luck!"]
_DISMISSIVE = [
    "No idea, figure it out yourself.", "Why would you even ask that?", "That is boring, go away.",
    "Not my problem.", "Just search it, stop asking me.", "Whatever, it does not matter.", "I will not help with that.",
    "You should already know this.",
]


def _pair(rng: random.Random, topic: str) -> dict:
    # Lengths vary inside each side (1-4 steps, 1-3 retorts), so a length reward has something to choose between
    steps = " ".join(rng.sample(_HELPFUL_STEPS, rng.randint(1, 4)))
    chosen = f" {rng.choice(_HELPFUL_OPENERS)} {steps} {rng.choice(_HELPFUL_CLOSERS)}"
    rejected = " " + " ".join(rng.sample(_DISMISSIVE, rng.randint(1, 3)))
    return {"prompt": f"User: How do I {topic}?\nAssistant:", "chosen": chosen, "rejected": rejected}


def make_demo_pairs(seed: int = 0, pairs_per_topic: int = 8, test_topics: int = 8) -> dict[str, list[dict]]:
    """Train and test splits of the demo task; the test split uses topics never seen in training."""
    rng = random.Random(seed)
    topics = list(_TOPICS)
    rng.shuffle(topics)
    splits = {"test": topics[:test_topics], "train": topics[test_topics:]}
    return {name: [_pair(rng, t) for t in split for _ in range(pairs_per_topic)] for name, split in splits.items()}


def prepare_demo_assets(model_dir: str | Path, data_dir: str | Path, architecture: str = "llama", seed: int = 0):
    """Write the demo's tiny model + tokenizer to `model_dir` and its dataset (train/test JSONL) to `data_dir`.

    Existing assets are kept, so a re-run (or a second process) never overwrites what a first one wrote.
    """
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    splits = make_demo_pairs(seed=seed)
    if not (data_dir / "train.jsonl").exists():
        for name, rows in splits.items():  # atomic: a half-written split is never read
            write_text_atomic(data_dir / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    if not (model_dir / "config.json").exists():
        texts = [row[key] for rows in splits.values() for row in rows for key in ("prompt", "chosen", "rejected")]
        save_tiny_model(model_dir, architecture, texts, seed=seed)
    return model_dir, data_dir


def prepare_talking_model(path: str | Path, seed: int = 0) -> Path:
    """The demo's language model that stops by itself, for `gpo-trl iterate` and `evaluate --generate`: the demo's
    tiny model (its sibling `tiny-llama`, written as `gpo-trl train --config configs/demo.yaml` writes it, unless it
    is there already) after 150 causal-LM steps on the demo's training prompts + answers + EOS. Kept when present."""
    path = Path(path)
    if not (path / "config.json").is_file():
        tiny, _ = prepare_demo_assets(path.parent / "tiny-llama", path.parent / "preferences", seed=seed)
        train = make_demo_pairs(seed=seed)["train"]
        staging = path.with_name(f".{path.name}.saving")
        save_talking_model(staging, tiny, [r["prompt"] + r[side] for r in train for side in ("chosen", "rejected")])
        staging.replace(path)
    return path
