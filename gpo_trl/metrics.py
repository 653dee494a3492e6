"""What `GPOTrainer` logs: TRL's DPO metrics under TRL's names, plus `gpo/*` and `aux/*` diagnostics.

Contract (`GPOMetrics`, a mixin of `GPOTrainer`):
- Reads: the tensors the loss path hands it (token mask, fused-head outputs, log-ratios, margins, the auxiliary
  rewards); `self.beta`; the batch (`sequence_lengths` of a packed one, else `attention_mask`) for `num_tokens`.
- Changes: appends to TRL's `self._metrics[mode][name]` only (and TRL's `_total_train_tokens` counter), after a
  gather across processes, so every rank logs the global value; TRL's `log()` averages and clears them. The loss
  code never calls `self.log`. Nothing here changes the loss or its gradient (every tensor is detached or reduced
  to a Python number).
- Relies on these internals: TRL 1.16's `_metrics` store (dict of mode -> name -> list), `_total_train_tokens`,
  `_tp_size`, and the fused LM head's per-token `entropy`, `mean_logits` and `is_top1`.
"""

from __future__ import annotations

import torch

from . import packing


class GPOMetrics:
    """Mixin over TRL's `DPOTrainer`: one `_log_*` method per group of metrics."""

    def _gather_mean(self, value: torch.Tensor) -> float:
        return self.accelerator.gather(value.detach()).float().mean().item()

    def _gather_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(value.detach()).sum()

    def _log_token_metrics(self, mode, outputs, inputs, token_mask):
        """TRL's per-token metrics under TRL's names: entropy, num_tokens, logits/*, mean_token_accuracy.

        Sums are gathered across ranks before dividing, so every rank logs the global token average.
        """
        seq_len = token_mask.size(1)
        metrics = self._metrics[mode]
        n_tokens = self._gather_sum(token_mask.sum())
        entropy_sum = self._gather_sum((outputs.entropy[:, -seq_len:] * token_mask).sum())
        metrics["entropy"].append((entropy_sum / n_tokens).item() if n_tokens > 0 else 0.0)
        if mode == "train":  # tokens of the sequences as TRL counts them, whatever the batch layout
            lengths = inputs["sequence_lengths"] if packing.is_packed(inputs) else inputs["attention_mask"]
            self._total_train_tokens += self._gather_sum(lengths.sum()).item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_mask, rejected_mask = token_mask.bool().chunk(2)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2)
        for name, logits, mask in (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask)):
            count = self._gather_sum(mask.sum()).item()
            metrics[f"logits/{name}"].append(self._gather_sum(logits[mask].sum()).item() / count if count else 0.0)

        chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2)[0]
        count = self._gather_sum(chosen_mask.sum())
        correct = self._gather_sum((chosen_top1 & chosen_mask).sum())
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

    def _log_reward_metrics(self, mode, chosen_logratios, rejected_logratios, chosen_logps, rejected_logps):
        """TRL's implicit-reward metrics: rewards = beta * summed log-ratio, as DPO defines them."""
        metrics = self._metrics[mode]
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics["rewards/chosen"].append(self._gather_mean(chosen_rewards))
        metrics["rewards/rejected"].append(self._gather_mean(rejected_rewards))
        metrics["rewards/accuracies"].append(self._gather_mean((chosen_rewards > rejected_rewards).float()))
        metrics["rewards/margins"].append(self._gather_mean(chosen_rewards - rejected_rewards))
        metrics["logps/chosen"].append(self._gather_mean(chosen_logps))
        metrics["logps/rejected"].append(self._gather_mean(rejected_logps))

    def _log_gpo_diagnostics(self, mode, rho, scaled_margin, term, first: bool):
        """GPO paper, Sec. 3: E[rho], the offline regulariser 1/2 E[rho^2] (the paper's diagnostic; per unit of push
        the loss weighs it by 2 * beta * c_f, see `GPOLoss.c_f`), and how much of the batch still pushes, |f'(t)|.
        They describe the first f(beta * rho) term of `loss_type`; a later one logs its push as gpo/push/<entry>.
        Without such a term, only the margin's two (rho: the summed log-ratio margin)."""
        metrics = self._metrics[mode]
        if not first:
            metrics[f"gpo/push/{term.entry}"].append(self._gather_mean(term.loss.derivative(scaled_margin).abs()))
            return
        rho = rho.detach()
        metrics["gpo/margin"].append(self._gather_mean(rho))
        metrics["gpo/offline_reg"].append(0.5 * self._gather_mean(rho**2))
        if term is not None:
            metrics["gpo/push"].append(self._gather_mean(term.loss.derivative(scaled_margin).abs()))
            metrics["gpo/beta_effective"].append(float(term.beta))

    def _log_aux_metrics(self, mode, reward_chosen, reward_rejected, advantages, loss, logratios):
        """The auxiliary objective's `aux/*` metrics (see gpo_trl.auxiliary), `logratios` being the (2B,) h it used."""
        metrics = self._metrics[mode]
        metrics["aux/reward_chosen"].append(self._gather_mean(reward_chosen))
        metrics["aux/reward_rejected"].append(self._gather_mean(reward_rejected))
        metrics["aux/advantage_abs"].append(self._gather_mean(advantages.abs()))
        metrics["aux/loss"].append(self._gather_mean(loss))
        # Among the pairs the rewards tell apart: how often the policy's margin ranks them the designer's way
        gap = advantages.chunk(2)[0]
        ranked = gap != 0
        ranked_pairs = self._gather_sum(ranked.sum()).item()
        if ranked_pairs:
            chosen, rejected = logratios.detach().chunk(2)
            agrees = torch.sign(chosen - rejected) == torch.sign(gap)
            metrics["aux/designer_accuracy"].append(self._gather_sum((agrees & ranked).sum()).item() / ranked_pairs)
