"""`GPOTrainer`: TRL's `DPOTrainer` with the loss replaced by E[f(beta * rho)] for a pluggable f.

This module holds the idea: `_compute_loss` (one fused-head forward, the log-ratios, the loss, the checks) and
`_preference_loss` (the sum over the `loss_type` terms, each f(beta * rho) term being a GPO loss), plus the SFT and
auxiliary (UPO) terms and what TRL's dataset preparation needs to know about them. The rest of the difference from
`DPOTrainer` lives in collaborators, each a module whose docstring states its contract:

- `gpo_trl.nonfinite`: the non-finite guard (`training_step`, the optimizer no-op) and fp16 loss-scale handling;
- `gpo_trl.ref_precompute`: TRL's reference precompute behind the on-disk cache, rank 0 deciding for all ranks;
- `gpo_trl.batch_layout`: packed / prefix-shared batches and the forward that serves every layout;
- `gpo_trl.reference_free`: no reference model loaded or kept under `gpo_reference: none`;
- `gpo_trl.metrics`: TRL's metrics under TRL's names, plus `gpo/*` and `aux/*`;
- `gpo_trl.trl_compat`: the `loss_type` plan (its f(beta rho) entries as GPO losses, the rest through DPOTrainer's
  own code) and the LD-DPO / f-divergence / WPO knobs;
- `gpo_trl.build`: the loss, its beta, the `loss_type` plan and the auxiliary rewards, built once from the config.

Everything else (dataset preparation, PEFT with the disabled adapter as the reference, `precompute_ref_log_probs`,
the fused LM head that never builds the full (batch, seq, vocab) logits, gradient accumulation, evaluation, model
cards) is TRL's own code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import textwrap

import torch
from datasets import Dataset
from trl import DPOTrainer
from trl.data_utils import maybe_extract_prompt

from . import auxiliary, packing, trl_compat
from .batch_layout import BatchLayout
from .build import build_objective
from .config import GPOConfig
from .data import TOKEN_COLUMNS
from .fourbit import keep_4bit_layers_differentiable
from .guards import PreemptionCallback
from .metrics import GPOMetrics
from .nonfinite import LossScaleCallback, NonFiniteGuard, all_finite
from .ref_precompute import CachedReferencePrecompute
from .reference_free import drop_reference_adapter, reference_free_load

logger = logging.getLogger(__name__)


def _pretokenised(dataset) -> bool:
    """Rows that already hold the ids to train on (`prompt_ids`, `chosen_ids`, `rejected_ids`, as TRL's collator
    takes them), e.g. `gpo-trl iterate`'s pairs as sampled."""
    first = next(iter(dataset), None)
    return isinstance(first, dict) and all(first.get(c) is not None for c in TOKEN_COLUMNS)


def _without_prompt_only_rows(dataset, args, dataset_name):
    """What TRL's preparation does to ids beyond tokenising: drop rows whose prompt alone fills `max_length` under
    `keep_start` truncation (the collator would keep no completion token)."""
    if args.max_length is None or args.truncation_mode != "keep_start":
        return dataset
    kwargs = {"desc": f"Dropping fully truncated examples from {dataset_name} dataset"} if isinstance(
        dataset, Dataset) else {}
    return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length, **kwargs)


class GPOTrainer(NonFiniteGuard, CachedReferencePrecompute, BatchLayout, GPOMetrics, DPOTrainer):
    """Generalized Preference Optimization trainer. Same constructor as [`trl.DPOTrainer`]; `args` is a `GPOConfig`.

    loss = mean over pairs of f(beta_eff * rho), rho = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)],
    with f = `args.gpo_loss`, beta_eff = `args.effective_beta`, and rho per token when `args.gpo_length_normalize`;
    with TRL's `loss_type` list, the weighted sum of its terms (see `gpo_trl.trl_compat`).

    The bases, each a mixin with no state of its own beyond a few flags and references, in MRO order before
    `DPOTrainer`:
    `NonFiniteGuard` (wraps `training_step`: NaN/inf never reaches the weights), `CachedReferencePrecompute` (wraps
    `_precompute_ref_logps`: the reference pass reused across runs), `BatchLayout` (the collator swap and `_forward`
    for packed / prefix-shared batches), `GPOMetrics` (the `_log_*` methods). Only `training_step` and
    `_precompute_ref_logps` override a TRL method, and both call it through `super()`.
    """

    _tag_names = ["trl", "dpo", "gpo", "gpo_trl"]
    _name = "GPO"
    _paper = {
        "title": "Generalized Preference Optimization: A Unified Approach to Offline Alignment",
        "id": "2402.05749",
        "citation": textwrap.dedent("""\
            @inproceedings{tang2024generalized,
                title        = {{Generalized Preference Optimization: A Unified Approach to Offline Alignment}},
                author       = {Yunhao Tang and Zhaohan Daniel Guo and Zeyu Zheng and Daniele Calandriello and Rémi Munos and Mark Rowland and Pierre Harvey Richemond and Michal Valko and Bernardo Ávila Pires and Bilal Piot},
                year         = 2024,
                booktitle    = {Forty-first International Conference on Machine Learning, ICML 2024},
            }"""),
    }

    def __init__(self, model, ref_model=None, args: GPOConfig | None = None, *pos, **kwargs):
        if args is not None and not isinstance(args, GPOConfig):
            raise TypeError(f"GPOTrainer needs a GPOConfig, got {type(args).__name__}; GPOConfig takes the same fields.")
        if args is None:
            args = GPOConfig(output_dir="gpo-output")
        objective = build_objective(args)
        self.aux_rewards = objective.aux_rewards  # read by _prepare_dataset, which DPOTrainer.__init__ calls
        given = inspect.signature(DPOTrainer.__init__).bind(self, model, ref_model, args, *pos, **kwargs).arguments
        self._check_model_for_batch_layout(model, args, given.get("train_dataset"), given.get("peft_config"),
                                           given.get("compute_metrics"))
        keep_4bit_layers_differentiable(*(m for m in (model, ref_model) if isinstance(m, torch.nn.Module)))
        # TRL 1.16 turns `padding_free` off for DPO with a warning; GPO implements it (gpo_trl.batch_layout)
        padding_free, args.padding_free = args.padding_free, False
        reference_free = args.gpo_reference == "none"
        if reference_free and ref_model is not None:
            raise ValueError("`gpo_reference: none` trains reference-free, but a `ref_model` was passed. Drop the "
                             "ref_model, or set `gpo_reference: model` to use it.")
        try:
            with reference_free_load(model) if reference_free else contextlib.nullcontext():
                super().__init__(model, ref_model, args, *pos, **kwargs)
        finally:
            args.padding_free = padding_free
        if reference_free:
            drop_reference_adapter(self.model)
        keep_4bit_layers_differentiable(self.model, self.ref_model)  # for evaluate() and generation during the run
        self.padding_free = padding_free
        self._use_batch_layout(args)
        if self.aux_rewards:
            self.data_collator = auxiliary.RewardCollator(self.data_collator, auxiliary.REWARD_COLUMNS)
        self.preemption = PreemptionCallback(self.accelerator)
        self.add_callback(self.preemption)
        self.add_callback(LossScaleCallback(self.accelerator, self._metrics["train"]))
        self.gpo_loss, self.loss_plan = objective.loss, objective.plan
        if args.loss_type != ["sigmoid"] or args.loss_weights:
            if self.accelerator.is_main_process:
                logger.warning("GPO loss: %s.", self.loss_plan.describe())
        # TRL reads self.beta for its rewards; under beta_calibration the loss runs at the calibrated beta.
        self.beta = objective.beta
        self.dataset_names: list[str] | None = None  # recorded in the model card; the recipe sets it

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card, plus a GPO section: loss and formula, beta, hyperparameters, final metrics, loading snippet."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        from .hub import model_card_section

        datasets = self.dataset_names or ([dataset_name] if isinstance(dataset_name, str) else dataset_name)
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as card:
            card.write(model_card_section(self, datasets))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Score the auxiliary rewards once per row (cached by `datasets`), then TRL's own preparation, except for a
        pre-tokenised dataset: TRL 1.16 would re-tokenise it from its text (prompt + completion jointly, an EOS
        appended), which changes sampled ids; its ids go to TRL's collator as they are."""
        if self.aux_rewards and "aux_reward_chosen" not in dataset.column_names:
            dataset = auxiliary.add_reward_columns(dataset.map(maybe_extract_prompt), self.aux_rewards, dataset_name)
        if _pretokenised(dataset):
            dataset = _without_prompt_only_rows(dataset, args, dataset_name)
        else:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.train_sampling_strategy == "group_by_length" and args.length_column_name not in dataset.column_names:
            # transformers' LengthGroupedSampler reads this column; a pair costs its longer sequence in a padded batch
            dataset = dataset.map(lambda row: {args.length_column_name: len(row["prompt_ids"]) + max(
                len(row["chosen_ids"]), len(row["rejected_ids"]))}, desc=f"Measuring {dataset_name} lengths")
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [*(auxiliary.REWARD_COLUMNS if self.aux_rewards else ()),
                 *([self.args.length_column_name] if self.args.train_sampling_strategy == "group_by_length" else [])]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _compute_loss(self, model, inputs, return_outputs):
        """DPOTrainer's hook: one fused-head forward, the log-ratios against the reference, then the preference loss
        (+ SFT, auxiliary and MoE router terms); a non-finite training loss goes to the guard (gpo_trl.nonfinite)."""
        mode = "train" if self.model.training else "eval"
        fields = ("log_probs", "entropy", "mean_logits", "is_top1", *(("log_sum_sq_probs",) * self.use_weighting))
        outputs = self._forward(model, inputs, fields=fields,
                                **({"output_router_logits": True} if self.aux_loss_enabled else {}))

        token_mask = inputs["completion_mask"][:, 1:]  # (2B, T-1): log_probs are for tokens 1..T-1
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        per_token_logps = outputs.log_probs[:, -token_mask.size(1) :]
        logps = trl_compat.sequence_logps(per_token_logps, token_mask, self.ld_alpha)  # (2B,) over the completion
        chosen_logps, rejected_logps = logps.chunk(2)  # the collator stacks [chosen; rejected]
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(model, inputs)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps

        loss = self._preference_loss(mode, outputs, inputs, per_token_logps, token_mask, chosen_logratios,
                                     rejected_logratios, (ref_chosen_logps, ref_rejected_logps))
        if self.args.sft_coef:
            loss = loss + self.args.sft_coef * self._sft_loss(mode, per_token_logps, token_mask)
        if self.aux_rewards:
            loss = loss + self.args.aux_coef * self._auxiliary_loss(mode, chosen_logratios, rejected_logratios,
                                                                    inputs)
        if self.aux_loss_enabled:  # MoE router load balancing (TRL's "aux_loss", unrelated to the UPO objective)
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        if mode == "train" and not all_finite(self.accelerator, [loss.detach()]):
            loss = self._nonfinite("loss")

        self._log_token_metrics(mode, outputs, inputs, token_mask)
        self._log_reward_metrics(mode, chosen_logratios, rejected_logratios, chosen_logps, rejected_logps)
        if return_outputs:  # deprecated in TRL too: the fused head builds no logits, so recompute them
            with torch.no_grad():
                model_kwargs = self._model_kwargs(inputs)
                model_kwargs.pop("labels")
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _preference_loss(self, mode, outputs, inputs, per_token_logps, token_mask, chosen_logratios,
                         rejected_logratios, ref_logps):
        """Sum over the `loss_type` terms (gpo_trl.trl_compat): each f(beta * rho) member as its GPO loss, under
        the f-divergence margin and the WPO pair weights; the others through DPOTrainer's own code."""
        chosen_scores, rejected_scores = (
            trl_compat.divergence_scores(h, self.f_divergence_type, self.f_alpha_divergence_coef)
            for h in (chosen_logratios, rejected_logratios))
        pair_weights = None
        if self.use_weighting and self.loss_plan.margin_terms:  # TRL's own terms weight themselves
            log_sum_sq_probs = outputs.log_sum_sq_probs[:, -token_mask.size(1) :]
            pair_weights = trl_compat.wpo_weights(per_token_logps, log_sum_sq_probs, token_mask)
        loss = None
        for index, term in enumerate(self.loss_plan.margin_terms):
            if term.entry == "sigmoid":  # the GPO slot: f and beta are the trainer's (`gpo_loss`, effective beta)
                term = dataclasses.replace(term, loss=self.gpo_loss, beta=self.beta)
            rho = self._margin(chosen_scores, rejected_scores, inputs["completion_mask"], term.length_normalize)
            scaled_margin = term.beta * rho - term.margin  # t = beta * rho - gamma
            per_pair = term.loss(scaled_margin)
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            loss = per_pair.mean() * term.weight if loss is None else loss + per_pair.mean() * term.weight
            self._log_gpo_diagnostics(mode, rho, scaled_margin, term, first=index == 0)
        if not self.loss_plan.margin_terms:  # GPO's margin diagnostics still describe the run
            self._log_gpo_diagnostics(mode, chosen_logratios - rejected_logratios, None, None, first=True)
        if self.loss_plan.trl_terms:
            trl_loss = trl_compat.trl_terms_loss(self, outputs, inputs, *ref_logps)
            loss = trl_loss if loss is None else loss + trl_loss
        return loss

    def _auxiliary_loss(self, mode, chosen_logratios, rejected_logratios, inputs) -> torch.Tensor:
        """The reference-anchored UPO term (see gpo_trl.auxiliary), a mean over pairs like the GPO loss; logged."""
        reward_chosen, reward_rejected = inputs["aux_reward_chosen"], inputs["aux_reward_rejected"]
        advantages = auxiliary.pair_advantages(reward_chosen, reward_rejected)
        logratios = torch.cat([chosen_logratios, rejected_logratios])  # (2B,) h = log pi / ref
        if self.args.gpo_length_normalize:  # the per-token scale of the GPO margin
            logratios = logratios / inputs["completion_mask"].sum(dim=1).clamp(min=1)
        loss = auxiliary.aux_loss(self.gpo_loss, self.beta * logratios, advantages, self.args.aux_temperature).mean()
        self._log_aux_metrics(mode, reward_chosen, reward_rejected, advantages, loss, logratios)
        return loss

    def _sft_loss(self, mode, per_token_logps, token_mask) -> torch.Tensor:
        """NLL of the chosen completions, averaged over their tokens in the batch (TRL's `sft` loss), logged."""
        chosen_logps, chosen_mask = per_token_logps.chunk(2)[0], token_mask.chunk(2)[0].bool()
        nll = -chosen_logps[chosen_mask].mean()
        self._metrics[mode]["gpo/sft_loss"].append(self._gather_mean(nll))
        return nll

    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """log ref(y_w), log ref(y_l) per pair: 0 reference-free, precomputed, or a reference pass on this batch."""
        if self.args.gpo_reference == "none":  # reference-free: log pi_ref taken as 0, no reference pass
            return 0.0, 0.0
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        ref_model = self.ref_model if self.ref_model is not None else model
        if packing.is_packed(inputs):
            return self._packed_reference_logps(ref_model, inputs)
        # With PEFT and no ref_model, TRL's helper disables the adapter on `model` for this pass.
        return self.compute_ref_log_probs(ref_model, inputs)

    def _margin(self, chosen_logratios, rejected_logratios, completion_mask, length_normalize) -> torch.Tensor:
        """rho per pair: summed log-ratios, or per-token averages when `length_normalize` (TRL's IPO form)."""
        if length_normalize:
            chosen_len, rejected_len = completion_mask.sum(dim=1).clamp(min=1).chunk(2)
            chosen_logratios = chosen_logratios / chosen_len
            rejected_logratios = rejected_logratios / rejected_len
        return chosen_logratios - rejected_logratios
