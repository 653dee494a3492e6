"""The synthetic task: vocabulary and tokenizer, the programmatic gold reward, the "human" corpus, and the tiny
base LM pre-trained on it."""

from __future__ import annotations

import torch

from .config import StudyConfig

# Token ids: 0 = EOS, 1 = PAD, 2 = ":" (ends every prompt), 3.. = content tokens w0, w1, ...
EOS, PAD, SEP, FIRST_WORD = 0, 1, 2, 3
GOOD_EVERY = 4  # w0, w4, w8, ... are "good": a quarter of the vocabulary
TARGET_LENGTH = 6
# Gold reward weights. The best completions (about 6-8 distinct good words, echoing the prompt's good words) score
# about 7; the base LM's samples average about -0.6 (sd 2.1, see summary.json): room to improve and to overshoot.
W_GOOD, W_ECHO, W_REPEAT, W_LENGTH, W_JUNK = 1.0, 0.5, 1.0, 0.5, 2.0


def build_tokenizer(vocab: int):
    """A word-level tokenizer over the study's symbols: text "w3 w17 w0 w9 :" <-> ids, one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": EOS, "<|pad|>": PAD, ":": SEP, **{f"w{i}": FIRST_WORD + i for i in range(vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")


def body(completion: list[int]) -> list[int]:
    """The completion's tokens before its first EOS."""
    return completion[: completion.index(EOS)] if EOS in completion else list(completion)


def gold_reward(prompt: list[int], completion: list[int]) -> float:
    """Good tokens and prompt echoes add; repeats, junk (PAD/":" in a completion) and distance from the target length
    subtract. Repeating one good token buys +1 and costs -1, so the reward cannot be farmed by repetition."""
    tokens = body(completion)
    words = [t for t in tokens if t >= FIRST_WORD]
    good = sum((t - FIRST_WORD) % GOOD_EVERY == 0 for t in words)
    echo = sum(t in prompt for t in words)
    repeats = len(words) - len(set(words))
    junk = len(tokens) - len(words)
    length_gap = abs(len(tokens) - TARGET_LENGTH)
    return W_GOOD * good + W_ECHO * echo - W_REPEAT * repeats - W_JUNK * junk - W_LENGTH * length_gap


def random_prompts(n: int, config: StudyConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, prompt_length + 1): distinct content tokens, then the ":" separator."""
    words = torch.rand(n, config.vocab, generator=generator).argsort(dim=1)[:, : config.prompt_length] + FIRST_WORD
    return torch.cat([words, torch.full((n, 1), SEP)], dim=1)


def make_corpus(config: StudyConfig, generator: torch.Generator) -> list[list[int]]:
    """The "human" text the base LM imitates: lengths 2..max_new_tokens, tokens from a Zipf law whose ranking ignores
    the gold reward, with some copying from the prompt and some immediate repeats. Mediocre by design."""
    zipf = 1.0 / torch.arange(1, config.vocab + 1, dtype=torch.float) ** 0.8
    ranking = torch.randperm(config.vocab, generator=torch.Generator().manual_seed(1234))  # fixed: part of the task
    unigram = torch.empty(config.vocab).scatter_(0, ranking, zipf / zipf.sum())
    prompts = random_prompts(config.corpus_size, config, generator)
    sequences = []
    for prompt in prompts.tolist():
        length = int(torch.randint(2, config.max_new_tokens + 1, (1,), generator=generator))
        completion: list[int] = []
        for _ in range(length):
            u = float(torch.rand(1, generator=generator))
            if u < 0.2:  # echo a prompt word
                completion.append(prompt[int(torch.randint(config.prompt_length, (1,), generator=generator))])
            elif u < 0.35 and completion:  # repeat the previous word
                completion.append(completion[-1])
            else:
                completion.append(FIRST_WORD + int(torch.multinomial(unigram, 1, generator=generator)))
        sequences.append(prompt + completion + [EOS])
    return sequences


# --- The base LM ----------------------------------------------------------------------------------------------------


def build_model(config: StudyConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(model_config)


def pretrain(model, corpus: list[list[int]], config: StudyConfig, generator: torch.Generator) -> list[float]:
    """Plain next-token training on the completions (the prompts are uniform noise, nothing to learn there)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.base_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / config.base_steps)
    prompt_len = config.prompt_length + 1
    width = max(len(s) for s in corpus)
    ids = torch.full((len(corpus), width), PAD)
    for i, sequence in enumerate(corpus):
        ids[i, : len(sequence)] = torch.tensor(sequence)
    labels = ids.masked_fill(ids == PAD, -100)
    labels[:, :prompt_len] = -100
    losses = []
    model.train()
    for _ in range(config.base_steps):
        batch = torch.randint(len(corpus), (config.base_batch_size,), generator=generator)
        loss = model(input_ids=ids[batch], attention_mask=(ids[batch] != PAD).long(), labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def to_text(ids: list[int]) -> str:
    words = {EOS: "<|endoftext|>", PAD: "<|pad|>", SEP: ":"}
    return " ".join(words.get(t, f"w{t - FIRST_WORD}") for t in ids)
