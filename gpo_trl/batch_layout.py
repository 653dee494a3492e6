"""The trainer's side of packed and prefix-shared batches (the collator itself is `gpo_trl.packing`).

Contract (`BatchLayout`, a mixin of `GPOTrainer`):
- Reads: `args.padding_free`, `args.prefix_sharing`, `args.packing_strategy`, `args.max_length`,
  `args.pad_to_multiple_of`, the model's `attn_implementation`, and each batch (`packing.is_packed` tells a packed
  one by its keys).
- Changes: `_check_model_for_batch_layout` refuses, before the model loads, setups the layouts cannot serve.
  `_use_batch_layout` (after `DPOTrainer.__init__`) keeps TRL's padded collator as `_padded_collator` and, when a
  layout is on, installs `packing.PackedPreferenceCollator` as `data_collator`. `_forward` runs the fused-head forward
  on either layout and returns the per-token fields in the padded (2B, T-1) layout, so the loss and the metrics never
  see the packed one. `_with_padded_collator` lends TRL's collator back to code that expects its batches (TRL's
  reference precompute).
- Relies on these internals: TRL 1.16's `data_collator` (a `DataCollatorForPreference` stacking [chosen; rejected]),
  its model call with `fused_lm_head=True` (outputs `log_probs`, `entropy`, `mean_logits`, `is_top1`,
  `log_sum_sq_probs`), `compute_ref_log_probs`' contexts for the reference pass (`use_adapter`, and
  `disable_gradient_checkpointing`, redone here as `activation_checkpointing_off` under transformers 5's names),
  `_tokenizer`, and the fact that TRL 1.16 turns `padding_free` off for DPO (the trainer hides it from TRL's
  `__init__`).
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import is_peft_model
from trl.trainer.utils import use_adapter

from . import packing, trl_compat
from .auxiliary import REWARD_COLUMNS

# Batch keys the collators add that are not model inputs
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *REWARD_COLUMNS}


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


class BatchLayout:
    """Mixin over TRL's `DPOTrainer`: padded, packed (`padding_free`) or prefix-shared batches, one forward for all."""

    _padded_collator = None  # TRL's collator, set once TRL has built it; TRL's __init__ precomputes with its own

    @staticmethod
    def _check_model_for_batch_layout(model, args, train_dataset, peft_config, compute_metrics):
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

    def _use_batch_layout(self, args):
        """After TRL's __init__: keep its padded collator, and put the packed one in front when a layout is on."""
        self._padded_collator = self.data_collator  # TRL's; also used by the reference precompute
        if args.padding_free or args.prefix_sharing:
            self.data_collator = self._packed_collator(args)

    def _packed_collator(self, args) -> packing.PackedPreferenceCollator:
        """Packed / prefix-shared batches (see gpo_trl.packing); `_check_model_for_batch_layout` has vetted the setup."""
        self._attn_implementation = self.accelerator.unwrap_model(self.model).config._attn_implementation
        return packing.PackedPreferenceCollator(
            self._padded_collator, pad_token_id=self._tokenizer.pad_token_id, padding_free=args.padding_free,
            prefix_sharing=args.prefix_sharing, strategy=args.packing_strategy, row_length=args.max_length,
            pad_to_multiple_of=args.pad_to_multiple_of, block_mask=self._attn_implementation == "flex_attention")

    def _with_padded_collator(self, function, *args):
        """Run `function` with TRL's padded collator (TRL's precompute and reference helper expect its batches)."""
        packed, self.data_collator = self.data_collator, self._padded_collator
        try:
            return function(*args)
        finally:
            self.data_collator = packed

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

    def _packed_reference_logps(self, ref_model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference pass on a packed batch, under the same contexts as TRL's `compute_ref_log_probs`."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), activation_checkpointing_off(self.model, self.args.activation_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            per_token_logps = self._forward(ref_model, inputs, fields=("log_probs",)).log_probs
        return trl_compat.sequence_logps(per_token_logps, inputs["completion_mask"][:, 1:], self.ld_alpha).chunk(2)
