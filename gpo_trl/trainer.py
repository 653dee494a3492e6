"""`GPOTrainer`: TRL's `DPOTrainer` with the loss replaced by E[f(beta * rho)] for a pluggable f.

What changes relative to `DPOTrainer`: only `_compute_loss`. Everything else (dataset preparation, PEFT with the
disabled adapter as the reference, `precompute_ref_log_probs`, the fused LM head that never builds the full
(batch, seq, vocab) logits, gradient accumulation, evaluation, model cards) is TRL's own code path.

The override reuses TRL's public pieces: the fused LM head outputs (`log_probs`, `entropy`, `mean_logits`,
`is_top1`), `compute_ref_log_probs` for the reference pass, and the `_metrics` store. It logs TRL's metrics under
TRL's names, plus `gpo/*` diagnostics (see `_log_gpo_diagnostics`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import textwrap
import warnings
from pathlib import Path

import torch
from accelerate.utils import DistributedType, broadcast_object_list, is_peft_model
from datasets import Dataset, concatenate_datasets
from trl import DPOTrainer
from trl.data_utils import maybe_extract_prompt
from trl.trainer import dpo_trainer as trl_dpo_trainer
from trl.trainer.utils import use_adapter

from . import auxiliary, packing, refcache
from .config import GPOConfig
from .guards import NonFiniteError, PreemptionCallback, all_finite, nonfinite_message

_AUX_COLUMNS = ("aux_reward_chosen", "aux_reward_rejected")
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *_AUX_COLUMNS}


@contextlib.contextmanager
def activation_checkpointing_off(model, checkpointing_kwargs: dict | None):
    """TRL's `disable_gradient_checkpointing` under transformers 5's names (the old ones warn on every reference
    pass): recomputation is pointless without gradients, and is restored afterwards."""
    was_on = model.is_activation_checkpointing
    if was_on:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if was_on:
            model.activation_checkpointing_enable(checkpointing_kwargs)


@contextlib.contextmanager
def _reference_free_load(model):
    """Keep TRL's __init__ from loading a reference copy of the policy (it does so without PEFT or a precompute).

    TRL 1.16 loads through `create_model_from_path` twice at most, in this order: the policy (only when `model` is a
    path), then the reference. The reference load is answered with None, which TRL treats as "no reference model".
    """
    load = trl_dpo_trainer.create_model_from_path
    policy_loads = [model] if isinstance(model, str) else []

    def load_policy_only(path, **kwargs):
        if policy_loads:
            policy_loads.pop()
            return load(path, **kwargs)
        return None

    trl_dpo_trainer.create_model_from_path = load_policy_only
    try:
        yield
    finally:
        trl_dpo_trainer.create_model_from_path = load


class GPOTrainer(DPOTrainer):
    """Generalized Preference Optimization trainer. Same constructor as [`trl.DPOTrainer`]; `args` is a `GPOConfig`.

    loss = mean over pairs of f(beta_eff * rho), rho = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)],
    with f = `args.gpo_loss`, beta_eff = `args.effective_beta`, and rho per token when `args.gpo_length_normalize`.
    """

    # Per-run flags, set on the instance when they change (the reference precompute runs inside DPOTrainer.__init__)
    _window_poisoned = False  # a micro-batch of this accumulation window had a non-finite loss (on_nonfinite: skip)
    _reported_skip = False  # the optimizer reports its last step as skipped (see _drop_window)
    _warned_cache_not_shared = False
    _warned_gradient_check_off = False

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
        # Needed by _prepare_dataset and _precompute_ref_logps, which DPOTrainer.__init__ calls
        self.aux_rewards = args.build_aux_rewards()
        self._ref_cache_dir = Path(args.ref_logps_cache_dir) if args.ref_logps_cache_dir else refcache.default_cache_dir()
        given = inspect.signature(DPOTrainer.__init__).bind(self, model, ref_model, args, *pos, **kwargs).arguments
        self._check_model_for_batch_layout(model, args, given.get("train_dataset"), given.get("peft_config"),
                                 given.get("compute_metrics"))
        self._padded_collator = None  # set once TRL has built it; TRL's __init__ precomputes with its own
        # TRL 1.16 turns `padding_free` off for DPO with a warning; GPO implements it (gpo_trl.packing)
        padding_free, args.padding_free = args.padding_free, False
        if args.gpo_reference == "none" and ref_model is not None:
            raise ValueError("`gpo_reference: none` trains reference-free, but a `ref_model` was passed. Drop the "
                             "ref_model, or set `gpo_reference: model` to use it.")
        try:
            with _reference_free_load(model) if args.gpo_reference == "none" else contextlib.nullcontext():
                super().__init__(model, ref_model, args, *pos, **kwargs)
        finally:
            args.padding_free = padding_free
        if args.gpo_reference == "none" and "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")  # TRL's frozen copy of a loaded adapter: a reference, never used here
        self.padding_free = padding_free
        self._padded_collator = self.data_collator  # TRL's; also used by the reference precompute
        if args.padding_free or args.prefix_sharing:
            self.data_collator = self._packed_collator(args)
        if self.aux_rewards:
            self.data_collator = auxiliary.RewardCollator(self.data_collator, _AUX_COLUMNS)
        self.preemption = PreemptionCallback(self.accelerator)
        self.add_callback(self.preemption)
        self._skipped_batches = 0
        self.gpo_loss = args.build_loss()
        # TRL reads self.beta for its rewards; under beta_calibration the loss runs at the calibrated beta.
        self.beta = args.effective_beta
        self.dataset_names: list[str] | None = None  # recorded in the model card; the recipe sets it

    def _packed_collator(self, args: GPOConfig) -> packing.PackedPreferenceCollator:
        """Packed / prefix-shared batches (see gpo_trl.packing); `_check_model_for_batch_layout` has vetted the setup."""
        self._attn_implementation = self.accelerator.unwrap_model(self.model).config._attn_implementation
        return packing.PackedPreferenceCollator(
            self._padded_collator, pad_token_id=self._tokenizer.pad_token_id, padding_free=args.padding_free,
            prefix_sharing=args.prefix_sharing, strategy=args.packing_strategy, row_length=args.max_length,
            pad_to_multiple_of=args.pad_to_multiple_of, block_mask=self._attn_implementation == "flex_attention")

    @staticmethod
    def _check_model_for_batch_layout(model, args: GPOConfig, train_dataset, peft_config, compute_metrics):
        """Refuse setups packed or prefix-shared batches cannot serve, before the model is loaded."""
        if not (args.padding_free or args.prefix_sharing):
            return
        mode = "prefix_sharing" if args.prefix_sharing else "padding_free"
        first_row = next(iter(train_dataset)) if train_dataset is not None else {}
        if isinstance(first_row, dict) and ("image" in first_row or "images" in first_row):
            raise ValueError(f"`{mode}` supports text preference data only; this dataset has images. Set it to false.")
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(f"`{mode}` cannot be used with prompt-learning PEFT ({peft_config.peft_type}), whose "
                             "virtual tokens would be shared across packed sequences. Use LoRA or set it to false.")
        if compute_metrics is not None:  # TRL passes it logits, which would be laid out as packed rows here
            raise ValueError(f"`{mode}` cannot be used with `compute_metrics` (deprecated in TRL too): its logits would "
                             "come in the packed layout. Drop compute_metrics or set it to false.")
        if isinstance(model, str):
            attention = (args.model_init_kwargs or {}).get("attn_implementation") or "sdpa"  # transformers' default
        else:
            attention = model.config._attn_implementation
        if args.prefix_sharing and attention not in ("sdpa", "eager", "flex_attention"):
            raise ValueError(f"`prefix_sharing` needs a custom 4D attention mask, which attn_implementation={attention!r} "
                             "does not take. Load the model with attn_implementation 'flex_attention' (GPU), 'sdpa' or "
                             "'eager', or use `padding_free` alone (it works with flash-attention).")
        if args.prefix_sharing and attention == "flex_attention" and (args.use_cpu or not torch.cuda.is_available()):
            raise ValueError("`prefix_sharing` with attn_implementation='flex_attention' needs a GPU: FlexAttention has "
                             "no backward pass on the CPU (torch). Use attn_implementation 'sdpa' on the CPU.")

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
        """Score the auxiliary rewards once per row (cached by `datasets`), then TRL's own preparation."""
        if self.aux_rewards and "aux_reward_chosen" not in dataset.column_names:
            dataset = auxiliary.add_reward_columns(dataset.map(maybe_extract_prompt), self.aux_rewards, dataset_name)
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.train_sampling_strategy == "group_by_length" and args.length_column_name not in dataset.column_names:
            # transformers' LengthGroupedSampler reads this column; a pair costs its longer sequence in a padded batch
            dataset = dataset.map(lambda row: {args.length_column_name: len(row["prompt_ids"]) + max(
                len(row["chosen_ids"]), len(row["rejected_ids"]))}, desc=f"Measuring {dataset_name} lengths")
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precompute, behind a cache keyed by what the values depend on (see gpo_trl.refcache): a run that
        differs only in beta, the loss or the learning rate reuses the reference pass instead of redoing it."""
        if not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        if self._padded_collator not in (None, self.data_collator):  # a later precompute (evaluate), packing on
            return self._with_padded_collator(self._precompute_ref_logps, dataset, name, batch_size)
        path = self._ref_cache_dir / f"{self._shared_cache_key(dataset)}.arrow"
        cached = refcache.load(path, len(dataset))
        visible = self._ranks_with(cached is not None)
        if visible[0]:  # rank 0 decides for everyone: a rank that computed alone would wait in a collective forever
            if not all(visible):
                self._warn_cache_not_shared(path, visible)
                cached = Dataset(broadcast_object_list([cached.data.table if cached is not None else None])[0])
            self.accelerator.print(f"Reference log-probs for {name}: reused {path}")
            return concatenate_datasets([dataset.flatten_indices(), cached], axis=1)
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            refcache.store(dataset, path)
        self.accelerator.wait_for_everyone()
        visible = self._ranks_with(path.is_file())
        if not all(visible):
            self._warn_cache_not_shared(path, visible)
        return dataset

    def _shared_cache_key(self, dataset) -> str:
        """Rank 0's cache key, on every rank: the model hash is rank-dependent (ZeRO-3 shards the weights), as TRL
        notes where it broadcasts its own."""
        key = refcache.cache_key(dataset, self._precompute_model_hash, self.args) if self.accelerator.is_main_process \
            else None
        return broadcast_object_list([key])[0]

    def _ranks_with(self, flag: bool) -> list[bool]:
        """`flag` of every rank, in rank order."""
        flags = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return [bool(value) for value in flags.tolist()]

    def _warn_cache_not_shared(self, path, visible: list[bool]):
        if self._warned_cache_not_shared or not self.accelerator.is_main_process:
            return
        self._warned_cache_not_shared = True
        missing = ", ".join(f"rank {rank}" for rank, sees in enumerate(visible) if not sees)
        warnings.warn(f"The reference log-probs cache directory {path.parent} is not shared: {missing} cannot see "
                      f"{path.name}, which rank 0 wrote or read. Rank 0 sends the values to the others, so the run "
                      "is correct; set `ref_logps_cache_dir` to a directory every node sees to skip that.")

    def _with_padded_collator(self, function, *args):
        """Run `function` with TRL's padded collator (TRL's precompute and reference helper expect its batches)."""
        packed, self.data_collator = self.data_collator, self._padded_collator
        try:
            return function(*args)
        finally:
            self.data_collator = packed

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [*(_AUX_COLUMNS if self.aux_rewards else ()),
                 *([self.args.length_column_name] if self.args.train_sampling_strategy == "group_by_length" else [])]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        outputs = self._forward(model, inputs, **({"output_router_logits": True} if self.aux_loss_enabled else {}))

        token_mask = inputs["completion_mask"][:, 1:]  # (2B, T-1): log_probs are for tokens 1..T-1
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        logps = outputs.log_probs[:, -token_mask.size(1) :].sum(dim=1)  # (2B,) summed over completion tokens
        chosen_logps, rejected_logps = logps.chunk(2)  # the collator stacks [chosen; rejected]
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(model, inputs)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps

        rho = self._margin(chosen_logratios, rejected_logratios, inputs["completion_mask"])
        scaled_margin = self.beta * rho - self.args.gpo_margin  # t = beta * rho - gamma
        loss = self.gpo_loss(scaled_margin).mean()
        if self.args.sft_coef:
            per_token_logps = outputs.log_probs[:, -token_mask.size(1) :]
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
        self._log_gpo_diagnostics(mode, rho, scaled_margin)
        if return_outputs:  # deprecated in TRL too: the fused head builds no logits, so recompute them
            with torch.no_grad():
                model_kwargs = self._model_kwargs(inputs)
                model_kwargs.pop("labels")
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _model_kwargs(self, inputs) -> dict:
        """The model's inputs, with labels on the completion tokens only, for a padded or a packed batch."""
        if not packing.is_packed(inputs):
            kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            kwargs["labels"] = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            return kwargs
        kwargs = {key: inputs[key] for key in ("input_ids", "position_ids", "labels")}
        if "attention_mask" in inputs:  # prefix sharing: the branch mask
            kwargs["attention_mask"] = packing.model_attention_mask(inputs["attention_mask"], self._attn_implementation)
        elif "mask_document" in inputs:  # prefix sharing under flex_attention: the same rule as a BlockMask
            kwargs["attention_mask"] = packing.flex_block_mask(inputs["mask_document"], inputs["mask_branch"])
        return kwargs

    def _forward(self, model, inputs, fields=("log_probs", "entropy", "mean_logits", "is_top1"), **kwargs):
        """Fused-head forward; the per-token `fields` of a packed batch come back in the padded (2B, T-1) layout
        (the loss and the metrics read only those)."""
        outputs = model(**self._model_kwargs(inputs), **kwargs, use_cache=False, fused_lm_head=True)
        if packing.is_packed(inputs):
            shape = inputs["completion_mask"][:, 1:].shape
            for name in fields:
                setattr(outputs, name, packing.unpack(getattr(outputs, name), inputs["unpack_index"], shape))
        return outputs

    def training_step(self, *args, **kwargs):
        """TRL's step; at the last micro-step of an accumulation window, check that no NaN/inf gradient is about to
        reach the optimizer, and drop the whole window when it, or any of its micro-batches' losses, was not finite."""
        loss = super().training_step(*args, **kwargs)
        if not self.accelerator.sync_gradients:  # mid-accumulation: a NaN stays in the sum until the last micro-step
            return loss
        if not self._window_poisoned and not self._gradients_finite():
            self._nonfinite("gradients")
        if self._window_poisoned:
            self._window_poisoned = False
            self._drop_window()
        elif self._reported_skip:  # accelerate rewrites this flag only under AMP loss scaling: clear ours
            self.optimizer._is_overflow = self._reported_skip = False
        return loss

    def _gradients_finite(self) -> bool:
        """True when every gradient is finite on every process; each rank joins the gather, with or without grads.
        Where the gradients are out of reach the check is off: said once, loudly, and never counted as passed."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:  # the same on every rank: no gather
            self._warn_gradient_check_off(
                "DeepSpeed keeps the gradients in its own (partitioned) buffers and takes its optimizer step inside "
                "backward, before this check could run. With `on_nonfinite: skip` a skipped batch's zero loss still "
                "goes through that step (weight decay and the optimizer's moments move)")
            return True
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # One norm per tensor (no tensor-sized temporaries): a norm is finite iff every element is
        finite = all_finite(self.accelerator, [torch.stack(torch._foreach_norm(grads))] if grads else [])
        if not grads and any(p.requires_grad for p in self.model.parameters()):
            self._warn_gradient_check_off("no trainable parameter holds a .grad after backward (the gradients are "
                                          "kept elsewhere, as DeepSpeed ZeRO keeps them)")
        return finite

    def _warn_gradient_check_off(self, reason: str):
        if self._warned_gradient_check_off or not self.accelerator.is_main_process:
            return
        self._warned_gradient_check_off = True
        warnings.warn(f"The gradient finiteness check is OFF for this run: {reason}. Only the loss is checked "
                      "(before backward); watch `grad_norm` in the logs.")

    def _nonfinite(self, what: str) -> torch.Tensor:
        """Stop with an error naming the step, or mark the accumulation window for dropping and return a zero loss
        that still reaches every trainable parameter (so DDP's gradient hooks fire on all ranks). All ranks come here
        together: the checks gather."""
        if self.args.on_nonfinite == "stop":
            raise NonFiniteError(nonfinite_message(what, self.state.global_step + 1, self.args.output_dir))
        self._window_poisoned = True
        return sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)

    def _drop_window(self):
        """Make the coming optimizer step a no-op: the weights, the optimizer's state (AdamW's moments, step counts,
        weight decay) and the LR schedule stay exactly as they are. A zero gradient would not do: AdamW would still
        decay the weights and move its moments. The step reports itself skipped through accelerate's
        `step_was_skipped` (as an AMP overflow does), so transformers' Trainer leaves the LR scheduler alone;
        `global_step` still advances."""
        self._skipped_batches += 1
        self._metrics["train"]["gpo/skipped_batches"] = [self._skipped_batches]
        self.model.zero_grad(set_to_none=True)  # the window's earlier micro-batches go too; clipping sees no grads
        optimizer = self.optimizer  # accelerate's AcceleratedOptimizer

        def skipped_step(closure=None):
            del optimizer.step  # back to the class's step for the next window
            optimizer._is_overflow = True  # read by step_was_skipped

        optimizer.step = skipped_step
        self._reported_skip = True

    def _auxiliary_loss(self, mode, chosen_logratios, rejected_logratios, inputs) -> torch.Tensor:
        """The reference-anchored UPO term (see gpo_trl.auxiliary), a mean over pairs like the GPO loss; and its
        metrics."""
        reward_chosen, reward_rejected = inputs["aux_reward_chosen"], inputs["aux_reward_rejected"]
        advantages = auxiliary.pair_advantages(reward_chosen, reward_rejected)
        logratios = torch.cat([chosen_logratios, rejected_logratios])  # (2B,) h = log pi / ref
        if self.args.gpo_length_normalize:  # the per-token scale of the GPO margin
            logratios = logratios / inputs["completion_mask"].sum(dim=1).clamp(min=1)
        loss = auxiliary.aux_loss(self.gpo_loss, self.beta * logratios, advantages, self.args.aux_temperature).mean()
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
        return loss

    def _sft_loss(self, mode, per_token_logps, token_mask) -> torch.Tensor:
        """NLL of the chosen completions, averaged over their tokens in the batch (TRL's `sft` loss), logged."""
        chosen_logps, chosen_mask = per_token_logps.chunk(2)[0], token_mask.chunk(2)[0].bool()
        nll = -chosen_logps[chosen_mask].mean()
        self._metrics[mode]["gpo/sft_loss"].append(self._gather_mean(nll))
        return nll

    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.gpo_reference == "none":  # reference-free: log pi_ref taken as 0, no reference pass
            return 0.0, 0.0
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        ref_model = self.ref_model if self.ref_model is not None else model
        if not packing.is_packed(inputs):
            # With PEFT and no ref_model, TRL's helper disables the adapter on `model` for this pass.
            return self.compute_ref_log_probs(ref_model, inputs)
        # The same contexts as TRL's compute_ref_log_probs, around the packed forward
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), activation_checkpointing_off(self.model, self.args.activation_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            return self._forward(ref_model, inputs, fields=("log_probs",)).log_probs.sum(dim=1).chunk(2)

    def _margin(self, chosen_logratios, rejected_logratios, completion_mask) -> torch.Tensor:
        """rho per pair: summed log-ratios, or per-token averages when `gpo_length_normalize` (TRL's IPO form)."""
        if self.args.gpo_length_normalize:
            chosen_len, rejected_len = completion_mask.sum(dim=1).clamp(min=1).chunk(2)
            chosen_logratios = chosen_logratios / chosen_len
            rejected_logratios = rejected_logratios / rejected_len
        return chosen_logratios - rejected_logratios

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

    def _log_gpo_diagnostics(self, mode, rho, scaled_margin):
        """GPO paper, Sec. 3: E[rho], the offline regulariser 1/2 E[rho^2] (the paper's diagnostic; per unit of push
        the loss weighs it by 2 * beta * c_f, see `GPOLoss.c_f`), and how much of the batch still pushes."""
        metrics = self._metrics[mode]
        rho = rho.detach()
        metrics["gpo/margin"].append(self._gather_mean(rho))
        metrics["gpo/offline_reg"].append(0.5 * self._gather_mean(rho**2))
        metrics["gpo/push"].append(self._gather_mean(self.gpo_loss.derivative(scaled_margin).abs()))
        metrics["gpo/beta_effective"].append(float(self.beta))
