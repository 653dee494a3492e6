"""The GPO training recipe: parse a YAML recipe + command-line overrides, train, evaluate, save, push.

Reads top to bottom in execution order. Launched by `gpo-trl train` through `accelerate launch -m gpo_trl.recipe`,
or directly: `accelerate launch scripts/train.py --config configs/demo.yaml`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from trl import ModelConfig, ScriptArguments, TrlParser

from .atomic import check_output_dir, fault_point, read_marker, recover, replace_dir, write_marker
from .base_identity import base_identity
from .config import GPOConfig
from .data import DataArguments
from .errors import ConfigError, DataError, Interrupted, NonFiniteError, PushError
from .guards import last_complete_checkpoint
from .inputs import check_model_source, looks_like_a_path
from .reach import CHECKED_ENV, check_recipe_sources


@dataclass
class GPOScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` (dataset_name, dataset_config, splits) plus what the GPO recipe adds."""

    prepare_demo_assets: bool = field(
        default=False,
        metadata={
            "help": "Write the offline demo's tiny model to `model_name_or_path` and its dataset to `dataset_name` "
            "before training, when they do not exist yet (deterministic, no network)."
        },
    )
    eval_before_training: bool = field(
        default=False,
        metadata={"help": "Evaluate on the test split before training too, for a before/after summary."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an `output_dir` that holds files gpo-trl did not write (no `.gpo-trl` marker). "
            "Without it such a folder is refused, naming its files; a folder of an earlier gpo-trl run is reused "
            "(resumed from with `resume_from_checkpoint: last`, its final model replaced)."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A reference model other than the one training starts from (e.g. `gpo-trl iterate` with "
            "`reference: initial`): loaded like the policy (same dtype and quantization) and kept frozen. Default: "
            "the starting model itself (with LoRA: the base with the adapter disabled)."
        },
    )


def read_yaml_file(path: Path, what: str):
    """The YAML content of a config file (sweep, iterate, generation-evaluation), or a ConfigError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Cannot read {what} {path}: {err}") from err


def make_parser(prog: str | None = None) -> TrlParser:
    # allow_abbrev=False: argparse would otherwise silently read `--learning_rat` as `--learning_rate`.
    return TrlParser((GPOScriptArguments, GPOConfig, ModelConfig, DataArguments), prog=prog, allow_abbrev=False)


def parse_args(argv: list[str] | None = None):
    """Parse `--config recipe.yaml` and overrides into (script, training, model, dataset) arguments.

    Unlike TRL, an unknown key in the YAML or on the command line is an error with a "did you mean" hint:
    a typo in `beta` must never train with the default.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_config_file(argv)
    parser = make_parser()
    try:
        *parsed, yaml_unknown, cli_unknown = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as err:  # GPOConfig / DPOConfig / DataArguments __post_init__ checks
        raise ConfigError(str(err)) from err
    known = sorted({action.dest for action in parser._actions})
    problems = [_unknown_key_message(key, "the YAML recipe", known) for key in yaml_unknown[::2]]
    problems += [_unknown_key_message(tok, "the command line", known) for tok in cli_unknown if tok.startswith("-")]
    if cli_unknown and not problems:
        problems.append(f"Unexpected command-line values {cli_unknown}; options are written `--key value`.")
    if problems:
        raise ConfigError("\n".join(problems))
    _check_script_args(parsed[0])
    return tuple(parsed)


def _check_script_args(script_args):
    if script_args.dataset_streaming:
        raise ConfigError(
            "`dataset_streaming: true` is not supported by the GPO recipe: it checks every row, mixes sources by "
            "weight and holds out a split before any model is loaded, which needs the whole dataset. Remove it "
            "(the dataset is then memory-mapped from the datasets cache, not held in memory)."
        )


def _check_config_file(argv: list[str]):
    if "--config" not in argv:
        return
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ConfigError("`--config` needs a path to a YAML recipe.")
    path = argv[index + 1]
    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"Recipe file {path!r} does not exist.") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"Recipe file {path!r} is not valid YAML: {err}") from err
    if not isinstance(content, dict):
        raise ConfigError(f"Recipe file {path!r} must be a YAML mapping of `key: value` lines.")


def _unknown_key_message(key: str, where: str, known: list[str]) -> str:
    name = key.lstrip("-").split("=")[0].replace("-", "_")
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else " Run `gpo-trl train --help` for all keys."
    if not close and where == "the command line" and name in _accelerate_launch_options():
        hint = (f" `--{name}` is an `accelerate launch` option: with `gpo-trl train` it goes after `--`, e.g. "
                f"`gpo-trl train --config r.yaml -- --{name} ...` (see `gpo-trl train --help`).")
    return f"Unknown key {name!r} in {where}.{hint}"


def _accelerate_launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {option.lstrip("-").replace("-", "_") for action in launch_command_parser()._actions
            for option in action.option_strings}


def main(script_args, training_args, model_args, dataset_args):
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .data import build_datasets, summarize
    from .trainer import GPOTrainer

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and PartialState().num_processes == 1:
        raise ConfigError(
            f"{launched} processes were launched but each sees world size 1, so each would train alone and write "
            f"the same output_dir. On a machine without GPUs set `use_cpu: true` (DDP over gloo)."
        )
    prepare_output_dir(training_args.output_dir, script_args.overwrite_output_dir)
    if script_args.prepare_demo_assets:
        from .demo import prepare_demo_assets

        with PartialState().main_process_first():  # rank 0 writes, the others then read
            prepare_demo_assets(model_args.model_name_or_path, script_args.dataset_name, seed=training_args.seed)

    # Local folders here (one line naming the key; a tokenizer alone is enough to reach the data checks, which come
    # first); Hub ids through gpo_trl.reach (offline mode or no network, and how to use a local copy)
    if is_local(model_args.model_name_or_path):
        check_model_source(model_args.model_name_or_path, "`model_name_or_path`", adapter_ok=True,
                           files=("config.json", "tokenizer_config.json"))
    if is_local(script_args.ref_model_name_or_path):
        check_model_source(script_args.ref_model_name_or_path, "`ref_model_name_or_path`", adapter_ok=True)
    if os.environ.get(CHECKED_ENV) != model_args.model_name_or_path:  # `gpo-trl train` has checked them already
        check_recipe_sources(script_args, training_args, model_args, dataset_args)
    # Tokenizer and data first: every row is checked before the (expensive) model is loaded.
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    with PartialState().main_process_first():
        train_dataset, eval_dataset, reports = build_datasets(script_args, dataset_args, tokenizer,
                                                              training_args.max_length, seed=training_args.seed)
    PartialState().print(summarize(reports))
    claim_output_dir(training_args.output_dir)
    trainer = GPOTrainer(
        model=model_args.model_name_or_path,
        ref_model=load_reference(script_args, training_args, model_args),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.dataset_names = dataset_names(script_args, dataset_args)
    trainer.base_identity = base_identity(trainer.model, model_args.model_name_or_path)  # before training changes it
    if script_args.ignore_bias_buffers:
        ignore_bool_buffers(trainer.model)
    if model_args.load_in_4bit:
        from .fourbit import describe_4bit_kernel

        PartialState().print(describe_4bit_kernel(trainer.accelerator.device.type))
    before = trainer.evaluate() if eval_dataset is not None and script_args.eval_before_training else None
    trainer.train(resume_from_checkpoint=resume_point(training_args))
    if trainer.preemption.signal is not None:
        raise Interrupted(trainer.preemption.signal, trainer.state.global_step,
                          last_complete_checkpoint(trainer.args.output_dir))
    after = trainer.evaluate() if eval_dataset is not None else None

    save_final(trainer, training_args.output_dir, before, after)
    trainer.accelerator.print(format_summary(trainer, before, after))
    if training_args.push_to_hub:
        push(trainer)
    trainer.end()
    return trainer, before, after


def ignore_bool_buffers(model):
    """TRL's dpo script's `ignore_bias_buffers`: DDP skips syncing the model's bool buffers (causal-mask "bias"
    buffers that break its broadcast, transformers#22482). DDP reads this attribute when it wraps the model."""
    model._ddp_params_and_buffers_to_ignore = [name for name, buffer in model.named_buffers()
                                               if buffer.dtype == torch.bool]


def load_reference(script_args, training_args, model_args):
    """The explicit reference model, or None (TRL's default: the starting model, or the base with LoRA disabled)."""
    if script_args.ref_model_name_or_path is None:
        return None
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(training_args.model_init_kwargs or {})
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if PartialState().distributed_type.value in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # as TRL does for the policy: "auto" fails under DDP
    reference = create_model_from_path(script_args.ref_model_name_or_path, **kwargs)
    reference.requires_grad_(False)
    return reference.eval()


_LEGACY_RUN = re.compile(r"^(gpo_run\.json|checkpoint-\d+)$")


def is_local(name: str | None) -> bool:
    """A model named by a path (existing or not) rather than a Hub id."""
    return name is not None and (Path(name).expanduser().exists() or looks_like_a_path(str(name)))


def check_training_output_dir(output_dir: str, overwrite: bool):
    """Train only into a folder gpo-trl made (its `.gpo-trl` marker; an older version's gpo_run.json or
    checkpoint-N), a new or empty one, or with `overwrite_output_dir`. Read-only: `gpo-trl train` calls it before
    launching anything."""
    path = Path(output_dir)
    legacy = path.is_dir() and read_marker(path) is None and any(_LEGACY_RUN.match(p.name) for p in path.iterdir())
    check_output_dir(path, overwrite=overwrite or legacy, flag="--overwrite_output_dir true", strict=False,
                     what="`output_dir`")


def prepare_output_dir(output_dir: str, overwrite: bool):
    """Check output_dir (above), writing nothing. First undoes a final save that a kill cut between its two renames
    (gpo_trl.atomic), so that `resume_from_checkpoint: last` finds the checkpoints."""
    state = PartialState()
    if state.is_main_process:
        recover(Path(output_dir))
    state.wait_for_everyone()
    check_training_output_dir(output_dir, overwrite)
    state.wait_for_everyone()


def claim_output_dir(output_dir: str):
    """Mark output_dir as gpo-trl's, once the data checks have passed (a run refused before then writes nothing)."""
    path = Path(output_dir)
    if PartialState().is_main_process and read_marker(path) is None:
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, "train", [])


def save_final(trainer, output_dir: str, before: dict | None, after: dict | None):
    """The final model or adapter, its card and gpo_run.json replace the previous ones as a whole: everything is
    built in a sibling folder, next to hard links of the rest of output_dir (checkpoints, logs, the user's files),
    and swapped in (gpo_trl.atomic.replace_dir). A kill or a full disk mid-save leaves the previous output.

    Every process takes part in `save_model` (FSDP/ZeRO-3 gather the weights); the main process builds and swaps.
    `_internal_call=True`: Trainer.save_model would otherwise push to the Hub right away, before the card is written
    and outside our retry handling.
    """
    model_dir = Path(output_dir) / ".gpo-saving"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(model_dir, ignore_errors=True)  # leftovers of an earlier crash
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(model_dir), _internal_call=True)
    if trainer.accelerator.is_main_process:
        previous = set((read_marker(Path(output_dir)) or {}).get("files", []))
        keep = lambda name: name not in previous and name != model_dir.name  # noqa: E731
        with replace_dir(Path(output_dir), "train", strict=False, overwrite=True, carry=keep,
                         what="`output_dir`") as staging:
            for item in model_dir.iterdir():
                os.replace(item, staging / item.name)
            fault_point("saved model")
            with _output_dir(trainer, staging):
                trainer.create_model_card(dataset_name=", ".join(trainer.dataset_names))  # replaces PEFT's card
            fault_point("wrote card")
            write_run_record(trainer, before, after, staging / "gpo_run.json")
    trainer.accelerator.wait_for_everyone()


@contextmanager
def _output_dir(trainer, path: Path):
    """Point the trainer's output_dir at the staging folder while TRL writes the card there."""
    saved, trainer.args.output_dir = trainer.args.output_dir, str(path)
    try:
        yield
    finally:
        trainer.args.output_dir = saved


def write_run_record(trainer, before: dict | None, after: dict | None, path: Path):
    """gpo_run.json: the run's final metrics (last logged training values, then the held-out evaluation), its loss
    settings and its base model's identity (checked by `gpo-trl merge`), for sweeps and scripts."""
    from .hub import final_metrics

    metrics = {k: v for entry in trainer.state.log_history for k, v in entry.items()
               if isinstance(v, (int, float)) and not k.startswith("eval_")}
    metrics.update(final_metrics(trainer.state.log_history))
    metrics.update(after or {})
    metrics.update({f"before_{k}": v for k, v in (before or {}).items()})
    model = trainer.model
    quantization = "4-bit" if getattr(model, "is_loaded_in_4bit", False) else (
        "8-bit" if getattr(model, "is_loaded_in_8bit", False) else None)
    record = {"gpo_loss": trainer.args.gpo_loss, "beta": trainer.args.beta, "effective_beta": trainer.beta,
              "datasets": trainer.dataset_names, "quantization": quantization,  # read by `gpo-trl merge`
              "steps": trainer.state.global_step, "metrics": metrics,
              "base_model": getattr(trainer, "base_identity", None)}
    Path(path).write_text(json.dumps(record, indent=2))


def resume_point(training_args) -> str | None:
    """`last` (or `true`) means the newest complete checkpoint in output_dir (None: start fresh); a path as given."""
    value = training_args.resume_from_checkpoint
    if value is None:
        return None
    if str(value).lower() not in ("last", "true"):
        if not (Path(value) / "trainer_state.json").is_file():
            raise ConfigError(f"Checkpoint {value} is incomplete or missing (no trainer_state.json, which transformers "
                              "writes last): a save was cut short. Use `--resume_from_checkpoint last` for the newest "
                              "complete one.")
        return value
    checkpoint = last_complete_checkpoint(training_args.output_dir)
    PartialState().print(f"Resuming from {checkpoint}" if checkpoint else "No complete checkpoint yet: starting fresh.")
    return checkpoint


def dataset_names(script_args, dataset_args) -> list[str]:
    return [s.path or str(s.data_files) for s in dataset_args.datasets] or [script_args.dataset_name]


def push(trainer):
    """Push the saved run; a failure leaves output_dir intact and says how to retry (`gpo-trl push`)."""
    from .hub import push_failure

    try:
        trainer.push_to_hub(dataset_name=", ".join(trainer.dataset_names or []) or None)
    except Exception as err:
        raise push_failure(trainer.args.output_dir, trainer.hub_model_id or trainer.args.hub_model_id, err) from err
    trainer.accelerator.print(f"Pushed to the Hub: {trainer.hub_model_id}")


def evaluate_adapter(adapter_path: str, script_args, training_args, model_args, dataset_args) -> dict:
    """Held-out metrics of a trained adapter (or full model) against its base model as the reference."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import build_datasets, summarize
    from .trainer import GPOTrainer

    check_model_source(adapter_path, "`--adapter_path`", adapter_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(adapter_path)
    _, eval_dataset, reports = build_datasets(script_args, dataset_args, tokenizer, training_args.max_length,
                                              seed=training_args.seed)
    if eval_dataset is None:
        raise ConfigError(f"No evaluation split: {script_args.dataset_name!r} has no {script_args.dataset_test_split!r} "
                          "split. Set `dataset_test_split` or `test_split_size`.")
    print(summarize(reports))
    if (Path(adapter_path) / "adapter_config.json").is_file():
        model, ref_model = AutoPeftModelForCausalLM.from_pretrained(adapter_path), None
    else:  # a full fine-tune: the reference is the base model named in the recipe (none when reference-free)
        model = AutoModelForCausalLM.from_pretrained(adapter_path)
        ref_model = (AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
                     if training_args.gpo_reference == "model" else None)
    trainer = GPOTrainer(model=model, ref_model=ref_model, args=training_args, train_dataset=eval_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer)
    if ref_model is None and "ref" in trainer.model.peft_config:
        # TRL copies a loaded adapter into a frozen "ref" adapter (to continue training it); an evaluation measures
        # the adapter against the base model, which is what disabling all adapters gives.
        trainer.model.delete_adapter("ref")
    return trainer.evaluate()


def batch_layout(args) -> str:
    layout = " + ".join(name for name, on in (("packed", args.padding_free), ("prefix-shared", args.prefix_sharing)) if on)
    return layout or "padded"


def format_summary(trainer, before: dict | None, after: dict | None) -> str:
    """A short before/after table of the held-out metrics and where the output went."""
    args = trainer.args
    lines = [
        f"GPO run finished: loss {args.gpo_loss!r} ({trainer.gpo_loss.formula}), beta {args.beta:g}, "
        f"effective beta {trainer.beta:g}, {trainer.state.global_step} steps, world size "
        f"{trainer.accelerator.num_processes} ({trainer.accelerator.distributed_type.value}), "
        f"{batch_layout(args)} batches."
    ]
    if after is not None:
        rows = [("held-out loss", "eval_loss"), ("reward accuracy", "eval_rewards/accuracies"),
                ("reward margin", "eval_rewards/margins"), ("gpo margin E[rho]", "eval_gpo/margin")]
        lines.append(f"  {'':<20}" + (f"{'before':>10}" if before else "") + f"{'after':>10}")
        for label, key in rows:
            first = f"{before[key]:>10.4f}" if before else ""
            lines.append(f"  {label:<20}{first}{after[key]:>10.4f}")
        lines.append("  (reward accuracy counts ties as wrong; chance is 0.5)")
    lines.append(f"Model/adapter written to {args.output_dir}")
    return "\n".join(lines)


def run(argv: list[str] | None = None):
    """The recipe as a process: exit status 0, 1 (a named error: one paragraph on stderr, no traceback) or 3
    (preempted, the checkpoint saved). One of several ranks ends through `end_rank` instead of returning."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return run_recipe(argv)
    kept, code = None, 0
    try:
        kept = run_recipe(argv)  # the trainer, kept alive until the process ends: see end_rank
    except SystemExit as stop:
        kept, code = sys.exc_info(), stop.code
    except BaseException:  # noqa: BLE001 - printed as Python would, and the status is 1 as Python's would be
        kept, code = sys.exc_info(), 1
        traceback.print_exc()
    end_rank(code)


def run_recipe(argv: list[str] | None = None):
    try:
        return main(*parse_args(argv))
    except (ConfigError, DataError, PushError, NonFiniteError) as err:
        sys.exit(f"gpo-trl: {type(err).__name__}:\n{err}")
    except Interrupted as err:
        print(f"gpo-trl: {err}", file=sys.stderr)
        sys.exit(3)


def end_rank(code: int | str | None):
    """End one process of a distributed run: exit handlers run (loggers and trackers flush), objects are not torn down.

    Tearing down a gloo process group can hang or abort the process: torch destroys the group by joining its worker
    threads, and when DDP's gradient Reducer (C++, freed with the GIL held) drops the last reference, the join waits
    for a worker that is itself waiting for the GIL to free the tensors of the last collective. Seen here under load
    (py-spy: the main thread in ~ProcessGroupGloo -> thread::join under ~Reducer, a gloo worker in
    ~AsyncAllgatherWork waiting for the GIL; the launch held until killed), and at interpreter exit as
    "terminate called without an active exception" (SIGABRT). Ending with os._exit once everything is written
    skips that teardown: the operating system closes the sockets."""
    import atexit

    if isinstance(code, str):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter exit would run first (logging, trackers)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
