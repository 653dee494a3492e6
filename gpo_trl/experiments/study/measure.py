"""Sampling from a policy and scoring it: gold reward, win rate, KL(pi || ref) from its own samples, diversity."""

from __future__ import annotations

import math

import torch

from .config import StudyConfig
from .task import EOS, PAD, body, gold_reward


@torch.no_grad()
def sample(model, prompts: torch.Tensor, max_new_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Exact temperature-1 ancestral sampling over the full vocabulary (no top-k/top-p, so the KL estimate below is
    unbiased), with a KV cache. Every prompt has the same length, so no padding is involved. Tokens after the first
    EOS are set to PAD; the completion includes its EOS."""
    model.eval()
    out = model(input_ids=prompts, use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        next_token = torch.multinomial(probs, 1, generator=generator)
        tokens.append(next_token)
        out = model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True)
    completions = torch.cat(tokens, dim=1)
    return completions.masked_fill(~completion_mask(completions), PAD)


def completion_mask(completions: torch.Tensor) -> torch.Tensor:
    """True up to and including the first EOS (all True when the sample hit max_new_tokens)."""
    is_eos = (completions == EOS).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


@torch.no_grad()
def sequence_logprobs(model, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """log p(y|x) summed over the completion's tokens (EOS included), one value per row, in float64."""
    ids = torch.cat([prompts, completions], dim=1)
    logits = model(input_ids=ids).logits[:, prompts.size(1) - 1 : -1].double()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    return (logps * completion_mask(completions)).sum(dim=1)


def sample_in_batches(model, prompts, config: StudyConfig, generator, batch: int = 512) -> torch.Tensor:
    return torch.cat([sample(model, prompts[i : i + batch], config.max_new_tokens, generator)
                      for i in range(0, len(prompts), batch)])


def rewards(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    values = [gold_reward(p, c) for p, c in zip(prompts.tolist(), completions.tolist())]
    return torch.tensor(values, dtype=torch.float64)


def diversity(prompts: torch.Tensor, completions: torch.Tensor) -> dict:
    """How varied the samples are: distinct completions per prompt, mean length, and the empirical unigram entropy."""
    per_prompt: dict[tuple, set] = {}
    for p, c in zip(prompts.tolist(), completions.tolist()):
        per_prompt.setdefault(tuple(p), set()).add(tuple(body(c)))
    counts = per_prompt.values()
    samples_per_prompt = len(prompts) / len(per_prompt)
    tokens = torch.tensor([t for c in completions.tolist() for t in body(c)] or [EOS])
    freq = torch.bincount(tokens).double()
    freq = freq[freq > 0] / freq.sum()
    return {"distinct_per_prompt": sum(len(s) for s in counts) / len(per_prompt) / samples_per_prompt,
            "mean_length": float(completion_mask(completions).sum(dim=1).double().mean()) - 1,
            "unigram_entropy": float(-(freq * freq.log()).sum())}


def evaluate_policy(policy, reference, prompts, base_rewards, config: StudyConfig, seed: int) -> dict:
    """Gold reward, win rate against the base LM's samples on the same prompts, and KL(pi || ref) from pi's samples."""
    generator = torch.Generator().manual_seed(seed)
    completions = sample_in_batches(policy, prompts, config, generator)
    gold = rewards(prompts, completions)
    log_ratio = sequence_logprobs(policy, prompts, completions) - sequence_logprobs(reference, prompts, completions)
    n = len(gold)
    wins = (gold > base_rewards).double() + 0.5 * (gold == base_rewards).double()
    return {"gold_reward": gold.mean().item(), "gold_reward_se": (gold.std() / math.sqrt(n)).item(),
            "win_rate": wins.mean().item(), "kl": log_ratio.mean().item(),
            "kl_se": (log_ratio.std() / math.sqrt(n)).item(), **diversity(prompts, completions)}


@torch.no_grad()
def token_entropy(model, prompts, completions) -> float:
    """Mean entropy (nats) of the next-token distribution over the sampled completions' positions."""
    ids = torch.cat([prompts, completions], dim=1)
    logps = torch.log_softmax(model(input_ids=ids).logits[:, prompts.size(1) - 1 : -1].double(), dim=-1)
    entropy = -(logps.exp() * logps).sum(-1)
    mask = completion_mask(completions)
    return (entropy * mask).sum().item() / mask.sum().item()
