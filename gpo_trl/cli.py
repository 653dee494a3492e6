"""The `gpo-trl` command.

    gpo-trl train --config recipe.yaml [--key value ...] [--accelerate_config NAME|PATH] [--num_processes N]
                  [-- ACCELERATE_LAUNCH_FLAGS ...]
    gpo-trl evaluate --config recipe.yaml --adapter_path DIR [--metrics_file F.json] [--key value ...]
    gpo-trl evaluate --generate --config generate.yaml --adapter_path DIR [--out DIR]
    gpo-trl evaluate --compare --config generate.yaml DIR1 DIR2 ... [--out DIR]
    gpo-trl iterate --config rounds.yaml [--restart]
    gpo-trl push --output_dir DIR --hub_model_id ID [--private]
    gpo-trl merge --adapter_path DIR --output_dir OUT [--dtype bfloat16] [--overwrite] [--allow_different_base]
                  [--push_to_hub --hub_model_id ID]
    gpo-trl sweep --config sweep.yaml [--emit-slurm DIR | --point INDEX | --collect]
    gpo-trl study --config configs/studies/gold_reward.yaml --out docs/study
    gpo-trl losses
    gpo-trl --version;  gpo-trl [--verbose] COMMAND ...;  gpo-trl COMMAND --help

Every option is spelt `--snake_case` or `--kebab-case` alike. Each command is a thin layer over a function a Python
user can call (gpo_trl.recipe.run / parse_args + main, evaluate_adapter, online.iterate.run_iterate,
merge.merge_adapter, experiments.sweep.run_sweep, hub.push_output_dir, ...); its parser is built here without
importing torch, transformers or TRL, so every `--help` answers in well under 2 s.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import shlex
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, DataError, JudgeError, MergeError, PushError

# --- Flag spellings and parsers (light: nothing here imports torch, transformers or TRL) ---

def canonical(flag: str) -> str:
    """`--num-processes`, `--num_processes` and `--num_processes=2` all name `num_processes`."""
    return flag.lstrip("-").split("=")[0].replace("-", "_")


def normalize_flags(argv: list[str], known: list[str]) -> list[str]:
    """Rewrite each `--flag` (or `--flag=value`) to the spelling its parser registered, so that `--snake_case` and
    `--kebab-case` are the same option, as in HfArgumentParser. What follows a bare `--` is left alone."""
    spelling = {canonical(option): option for option in known if option.startswith("--")}
    out = []
    for index, token in enumerate(argv):
        if token == "--":
            return out + argv[index:]
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = spelling.get(canonical(name), name) + eq + value
        out.append(token)
    return out


def suggest(flag: str, known: list[str]) -> str:
    """' Did you mean --x?' for an unknown flag (accelerate's spellings included), or ''."""
    name = canonical(flag)
    alias = _ACCELERATE_ALIASES.get(name)
    if alias:
        return f" Did you mean `--{alias}`?"
    close = difflib.get_close_matches(name, sorted({canonical(k) for k in known if k.startswith("--")}), n=1,
                                      cutoff=0.6)
    return f" Did you mean `--{close[0]}`?" if close else ""


class CommandParser(argparse.ArgumentParser):
    """argparse with both flag spellings, no prefix matching (`--adapter` must not mean `--adapter_path`), the
    description printed as written, and "did you mean" for an unknown option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(normalize_flags(args, list(self._option_string_actions)), namespace)

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = list(self._option_string_actions)
        for token in normalize_flags(args, known):  # an unknown option first, before "X is required"
            if token == "--":
                break
            if token.startswith("--") and token.split("=")[0] not in self._option_string_actions:
                self.error(f"unknown option {token.split('=')[0]}.{suggest(token, known)}")
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            flag = next((token for token in extra if token.startswith("-")), None)
            if flag is None:
                self.error(f"unexpected argument(s): {' '.join(extra)}")
            self.error(f"unknown option {flag.split('=')[0]}.{suggest(flag, list(self._option_string_actions))}")
        return parsed


def module_doc(module: str) -> str:
    """A module's docstring, read from its source: its help must not import it (and with it torch or TRL)."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    return ast.get_docstring(ast.parse(source)) or ""


# Options meant for `accelerate launch`, not for the recipe. Everything else must be a recipe key.
_LAUNCH_OPTIONS = {"--accelerate_config", "--num_processes", "--num_machines", "--machine_rank", "--mixed_precision",
                   "--main_process_ip", "--main_process_port"}
# accelerate's own spelling of one of ours (`accelerate launch --config_file F` = `gpo-trl train --accelerate_config F`)
_ACCELERATE_ALIASES = {"config_file": "accelerate_config"}
_ACCELERATE_CONFIGS = Path(__file__).parent / "accelerate_configs"


def split_launch_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `accelerate launch` options (with their values) from the recipe's arguments."""
    launch, recipe = [], []
    tokens = iter(argv)
    for token in tokens:
        name, has_value, value = token.partition("=")
        if token.startswith("--"):  # both spellings, and accelerate's --config_file for --accelerate_config
            name = "--" + _ACCELERATE_ALIASES.get(canonical(name), canonical(name))
        if name in _LAUNCH_OPTIONS:
            value = value if has_value else next(tokens, None)
            if value is None:
                raise ConfigError(f"`{name}` needs a value.")
            launch += [name, value]
        else:
            recipe.append(token)
    return launch, recipe


def accelerate_launch_args(launch: list[str]) -> list[str]:
    """Translate our launch options to `accelerate launch` flags (config names resolve to shipped files)."""
    options = dict(zip(launch[::2], launch[1::2]))
    args = []
    config = options.pop("--accelerate_config", None)
    if config is not None:
        args += ["--config_file", str(resolve_accelerate_config(config))]
    num_processes = options.get("--num_processes")
    if num_processes is not None and int(num_processes) > 1 and config is None:
        # Without a config file, several processes need --multi_gpu; with `use_cpu: true` in the recipe this is DDP
        # over gloo on the CPU (`--cpu` would start a single process: measured, accelerate 1.16).
        args.append("--multi_gpu")
    for name, value in options.items():
        args += [name, value]
    if "--main_process_port" not in options and _single_machine(options, config):
        # accelerate's fixed default port (29500) makes two local jobs collide: the second one's processes can join
        # the first one's rendezvous and wait forever. A free port per launch avoids that.
        args += ["--main_process_port", str(_free_port())]
    if config is None and not _has_default_accelerate_config():
        # Spell out accelerate's defaults so it does not warn about each one on every run.
        defaults = {"--num_processes": "1", "--num_machines": "1", "--mixed_precision": "no", "--dynamo_backend": "no"}
        args += [item for name, value in defaults.items() if name not in args for item in (name, value)]
    return args


def _single_machine(options: dict, config: str | None) -> bool:
    import yaml

    settings = yaml.safe_load(resolve_accelerate_config(config).read_text()) if config else {}
    if "main_process_port" in (settings or {}):
        return False
    return int(options.get("--num_machines", (settings or {}).get("num_machines", 1))) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _has_default_accelerate_config() -> bool:
    from accelerate.commands.config import default_config_file

    return Path(default_config_file).is_file()


def resolve_accelerate_config(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _ACCELERATE_CONFIGS / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in _ACCELERATE_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"Accelerate config {name_or_path!r} is neither a file nor one of the shipped configs: {names}.")


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """`gpo-trl train ... -- --rdzv_backend c10d --max_restarts 1`: what follows `--` goes to `accelerate launch`
    verbatim (after our own launch flags, so it wins where both set the same flag)."""
    if "--" not in argv:
        return argv, []
    index = argv.index("--")
    return argv[:index], argv[index + 1:]


def train(argv: list[str]) -> int:
    argv, passthrough = split_passthrough(argv)
    launch, recipe_args = split_launch_args(argv)
    launch_flags = accelerate_launch_args(launch) + passthrough  # a bad launch option fails here, in a blink
    from .reach import check_model_early

    check_model_early(recipe_args)  # an unreachable model fails here too, before TRL is imported (gpo_trl.reach)

    from accelerate.commands.launch import launch_command, launch_command_parser

    from .reach import CHECKED_ENV, check_recipe_sources
    from .recipe import check_training_output_dir, parse_args

    parsed = parse_args(recipe_args)  # fail here, before any process starts, on a bad recipe
    check_recipe_sources(*parsed)  # and on a model or dataset that cannot be reached (gpo_trl.reach)
    os.environ[CHECKED_ENV] = parsed[2].model_name_or_path or ""  # the launched recipe need not ask the Hub again
    script_args, training_args, *_ = parsed
    check_training_output_dir(training_args.output_dir, script_args.overwrite_output_dir)
    accelerate_args = parse_accelerate_args(launch_flags, recipe_args, launch_command_parser())
    _forward_signals_to_children()
    # Several processes run under torchrun's agent, in this process, which by default takes SIGTERM/SIGINT over
    # (raises, kills the workers 30 s later, exit 1 with a traceback: measured with cpu_ddp, so a SLURM job was not
    # requeued). torchrun's `signals_to_handle` (accelerate hands matching attributes on to torchrun) leaves them to
    # the forwarder above: the workers checkpoint and exit 3.
    accelerate_args.signals_to_handle = "SIGHUP,SIGQUIT"
    try:
        with _one_local_process_runs_here(recipe_args):
            launch_command(accelerate_args)
    except subprocess.CalledProcessError as err:  # the recipe has already said why; keep its exit code
        return err.returncode
    except Exception as err:  # torchrun's ChildFailedError: the failing rank's traceback was printed above
        if type(err).__name__ != "ChildFailedError":
            raise
        # 3 (resumable) when a rank was interrupted after a checkpoint and the others were too, or were stopped by
        # the agent's closing SIGTERM once that rank had exited: a rank that has finished train() has its default
        # handler back, so that SIGTERM can kill it (-15) on its way out. (One test run in five exited 1 before this
        # change; its output was not kept, so that this race was the cause is a guess.)
        codes = {failure.exitcode for failure in err.failures.values()}
        return 3 if 3 in codes and codes <= {3, -signal.SIGTERM} else 1
    return 0


@contextmanager
def _one_local_process_runs_here(recipe_args: list[str]):
    """While `launch_command` runs, accelerate's launcher for a single local process runs the recipe in this process,
    in the environment accelerate would give its child (`prepare_simple_launcher_cmd_env`: mixed precision, dynamo,
    CPU threads, ...). Multi-process, DeepSpeed and FSDP launches are untouched.

    Why not a child process: the training stack is imported once instead of twice (16 s of a small run on this 2-core
    machine), and a SIGTERM reaches the trainer itself, which checkpoints and exits 3. accelerate 1.16's child runner
    turns SIGTERM into exit 143 and kills the child 5 s later, before a large model's checkpoint is written
    (measured: exit 143, so the SLURM script did not requeue)."""
    import accelerate.commands.launch as accelerate_launch

    def run_here(args):
        import torch
        from accelerate.state import AcceleratorState
        from accelerate.utils import prepare_simple_launcher_cmd_env

        from .recipe import run

        _, env = prepare_simple_launcher_cmd_env(args)
        os.environ.update(env)
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # read by torch at import, before env was set
        # The recipe check above built accelerate's state before this environment existed; the recipe builds it anew.
        AcceleratorState._reset_state(reset_partial_state=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no children to forward to: the trainer's guard takes over
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run(recipe_args)

    launcher = accelerate_launch.simple_launcher
    accelerate_launch.simple_launcher = run_here
    try:
        yield
    finally:
        accelerate_launch.simple_launcher = launcher


def parse_accelerate_args(launch_flags: list[str], recipe_args: list[str], launch_parser):
    """accelerate's own parser reads the launch flags; a flag it does not know is a ConfigError naming it."""
    unknown = [flag for flag in launch_flags if flag.startswith("--") and flag.split("=")[0] not in
               {opt for action in launch_parser._actions for opt in action.option_strings}]
    if unknown:
        raise ConfigError(f"`accelerate launch` has no option {unknown[0]!r} (given after `--`); see "
                          "`accelerate launch --help`.")
    return launch_parser.parse_args(launch_flags + ["-m", "gpo_trl.recipe"] + recipe_args)


def _forward_signals_to_children():
    """A SIGTERM/SIGINT sent to this launcher alone reaches the training process too, which then saves a checkpoint
    and stops (gpo_trl.guards). The launcher itself keeps waiting for it, so its exit code is the recipe's."""
    import psutil

    def forward(signum, frame):
        for child in psutil.Process().children():
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)


def evaluate_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl evaluate", usage="gpo-trl evaluate --config RECIPE.yaml --adapter_path DIR "
                           "[--metrics_file F.json] [--key value ...]\n       gpo-trl evaluate --generate --config "
                           "GENERATE.yaml --adapter_path DIR [--out DIR]\n       gpo-trl evaluate --compare --config "
                           "GENERATE.yaml DIR1 DIR2 ... [--out DIR]",
                           description="Held-out preference metrics of a trained run (its recipe's test split, the "
                           "base model as the reference); or, with --generate / --compare, sample from the policies "
                           "and score the samples (`gpo-trl evaluate --generate --help`).")
    parser.add_argument("--adapter_path", required=True, help="a trained run's output_dir (adapter or full model)")
    parser.add_argument("--metrics_file", help="where to write the metrics as JSON (default: <adapter_path>/"
                        "eval_metrics.json)")
    parser.add_argument("--config", metavar="RECIPE.yaml", help="the run's recipe; any other recipe key may follow "
                        "as --key value")
    return parser


def evaluate(argv: list[str]) -> int:
    if "--generate" in argv or "--compare" in argv:
        return evaluate_generate(argv)
    own, recipe_args = evaluate_parser().parse_known_args(argv)
    if own.config is not None:
        recipe_args = ["--config", own.config, *recipe_args]

    from .atomic import write_text_atomic
    from .recipe import evaluate_adapter, parse_args

    metrics = evaluate_adapter(own.adapter_path, *parse_args(recipe_args))
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    path = Path(own.metrics_file or Path(own.adapter_path) / "eval_metrics.json")
    write_text_atomic(path, json.dumps(metrics, indent=2))  # never a half-written metrics file
    print(f"Metrics written to {path}")
    return 0


def generate_eval_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl evaluate --generate", description=module_doc("gpo_trl.online.generate_eval"))
    parser.add_argument("--generate", action="store_true", help="evaluate one policy (--adapter_path)")
    parser.add_argument("--compare", action="store_true", help="evaluate the policies given as arguments")
    parser.add_argument("--config", required=True, help="the generation-evaluation file")
    parser.add_argument("--adapter_path", help="with --generate: an adapter directory or a full model")
    parser.add_argument("--out", help="output folder (default: <adapter>/generate_eval; with --compare: each "
                        "policy's own, plus the table in ./generate_compare)")
    parser.add_argument("--overwrite", action="store_true", help="replace output folders even where they hold files "
                        "gpo-trl did not write there (they are deleted)")
    parser.add_argument("policies", nargs="*", help="with --compare: the policies (adapter or model directories)")
    return parser


def evaluate_generate(argv: list[str]) -> int:
    from .online.generate_eval import main as generate_main

    return generate_main(argv)


def iterate_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl iterate", description=module_doc("gpo_trl.online.iterate"))
    parser.add_argument("--config", required=True, help="the iterate file")
    parser.add_argument("--restart", action="store_true", help="delete the rounds in output_dir made with another "
                        "definition (recipe, judge, generation, pairing, prompts, seed) and start over")
    return parser


def iterate(argv: list[str]) -> int:
    args = iterate_parser().parse_args(argv)
    from .online.iterate import load_plan, run_iterate

    plan = load_plan(args.config)  # the whole file and the round recipe are checked before any model loads
    rows = run_iterate(plan, restart=args.restart)
    print(f"{len(rows)} rounds in {plan.output_dir / 'rounds.csv'}")
    return 0


def push_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl push", description="Push a finished run's output_dir to the Hub.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--hub_model_id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision")
    return parser


def push(argv: list[str]) -> int:
    args = push_parser().parse_args(argv)
    from .hub import push_output_dir

    url = push_output_dir(args.output_dir, args.hub_model_id, private=args.private or None, revision=args.revision)
    print(f"Pushed {args.output_dir} to {url}")
    return 0


# gpo_trl.merge.TOLERANCES (imports the training stack), copied for the help; tests/test_cli.py keeps them equal
MERGE_TOLERANCES = {"float32": 1e-5, "bfloat16": 0.1, "float16": 0.05}


def merge_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl merge", description="Merge a trained LoRA/QLoRA adapter into its "
                           "base model and save a standalone model (checked against the adapter first).")
    parser.add_argument("--adapter_path", required=True, help="a LoRA/QLoRA run's output_dir")
    parser.add_argument("--output_dir", required=True, help="where the merged model goes (new, empty, or an earlier "
                        "merge's output)")
    parser.add_argument("--dtype", default="float32", choices=sorted(MERGE_TOLERANCES),
                        help="dtype the base is loaded and merged in (a QLoRA base too: never the 4-bit weights)")
    parser.add_argument("--tolerance", type=float, help="largest accepted per-token log-prob difference between the "
                        f"merged model and the adapter on the base (default: {MERGE_TOLERANCES})")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT even when it holds files gpo-trl did "
                        "not write there (they are deleted)")
    parser.add_argument("--allow_different_base", action="store_true", help="merge even when the base model is not "
                        "the one the adapter was trained on (recorded in its gpo_run.json)")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id")
    parser.add_argument("--private", action="store_true")
    return parser


def merge(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    from .merge import merge_adapter

    try:
        merge_adapter(args.adapter_path, args.output_dir, dtype=args.dtype, tolerance=args.tolerance,
                      push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id, private=args.private or None,
                      overwrite=args.overwrite, allow_different_base=args.allow_different_base)
    except MergeError as err:
        print(f"gpo-trl: {err}", file=sys.stderr)
        return 1
    return 0


def sweep_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl sweep", description=module_doc("gpo_trl.experiments.sweep"))
    parser.add_argument("--config", required=True, help="the sweep file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--emit-slurm", metavar="DIR", dest="emit_slurm",
                      help="write DIR/sweep.sbatch, a SLURM job array with one task per unfinished point, instead "
                      "of running the points here")
    mode.add_argument("--point", type=int, metavar="INDEX", help="run one point (0-based, in grid order), resuming "
                      "from its last checkpoint; what each task of the SLURM array runs")
    mode.add_argument("--collect", action="store_true", help="rebuild results.csv and the plots from the points' "
                      "outputs (after a SLURM array)")
    parser.add_argument("--overwrite", action="store_true", help="with --emit-slurm: replace an existing "
                        "DIR/sweep.sbatch (by default an existing one is an error)")
    return parser


def sweep(argv: list[str]) -> int:
    parser = sweep_parser()
    args = parser.parse_args(argv)
    if args.overwrite and not args.emit_slurm:
        parser.error("--overwrite goes with --emit-slurm DIR (it lets a new sweep.sbatch replace DIR's)")
    from .experiments.sweep import load_sweep, run_sweep

    plan = load_sweep(args.config)  # every point is checked before the first one runs
    if args.emit_slurm:
        return _emit_slurm(plan, args.config, args.emit_slurm, args.overwrite)
    if args.point is not None:
        return _sweep_point(plan, args.point)
    if args.collect:
        from .experiments.sweep import collect_points

        rows, missing = collect_points(plan)
        print(f"{len(rows)} points in {plan.output_dir / 'results.csv'}"
              + (f"; not finished: {', '.join(missing)}" if missing else ""))
        return 0
    rows = run_sweep(plan)
    print(f"{len(rows)} points in {plan.output_dir / 'results.csv'}")
    return 0


def _emit_slurm(plan, config: str, directory: str, overwrite: bool = False) -> int:
    from .experiments.slurm_array import emit_slurm_array

    script = emit_slurm_array(plan, config, directory, overwrite)
    if script is None:
        print(f"Every point of {config} is finished; nothing to submit. `gpo-trl sweep --config {config} --collect` "
              "rebuilds the table and plots.")
    else:
        print(f"Wrote {script} (points and commands: {script.parent / 'points.tsv'}). Submit with: "
              f"sbatch {shlex.quote(str(script))}")
    return 0


def _sweep_point(plan, index: int) -> int:
    from .experiments.sweep import finished, point_name, run_point

    points = plan.points()
    if not 0 <= index < len(points):
        raise ConfigError(f"`--point {index}` is out of range: the sweep has {len(points)} points "
                          f"(0-{len(points) - 1}).")
    point = points[index]
    if finished(plan, point):
        print(f"Point {index} ({point_name(point)}) finished earlier, skipped.")
        return 0
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    _forward_signals_to_children()  # a TERM to this task reaches the point's training (it checkpoints, exits 3)
    return run_point(plan, point, resume=True)


def study_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl study", description=module_doc("gpo_trl.experiments.study"))
    parser.add_argument("--config", required=True, help="the study file (configs/studies/*.yaml)")
    parser.add_argument("--out", required=True, help="where results, tables and plots are written")
    parser.add_argument("--seed", type=int, help="overrides the file's seed")
    parser.add_argument("--replot", action="store_true",
                        help="redraw tables and plots from the results already in --out, without training")
    return parser


def study(argv: list[str]) -> int:
    study_parser().parse_args(argv)  # a bad option fails here, before the study's modules load
    from .experiments.study import main as study_main

    study_main(argv)
    return 0


def losses_parser() -> CommandParser:
    return CommandParser(prog="gpo-trl losses", description="The registered GPO loss functions f: formula, f'(0), "
                         "f''(0) (measured with autograd), c_f and convexity.")


def losses(argv: list[str]) -> int:
    losses_parser().parse_args(argv)
    from .losses import format_number, loss_table

    header = ("name", "f(t)", "f'(0)", "f''(0)", "c_f", "convex")
    rows = [(r["name"], r["formula"], format_number(r["d1_at_0"]), format_number(r["d2_at_0"]),
             format_number(r["c_f"]), "yes" if r["convex"] else "no") for r in loss_table()]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nc_f = f''(0) / (2 |f'(0)|): offline-regularisation strength per unit beta (GPO paper, Sec. 4).")
    return 0


COMMANDS = {"train": "run a recipe", "evaluate": "score a trained adapter (or sample and judge it)",
            "push": "upload a finished run", "merge": "fold a LoRA adapter into its base model",
            "sweep": "a grid of runs", "iterate": "on-policy rounds with a judge",
            "study": "the controlled gold-reward study", "losses": "list the GPO loss functions"}
_HELP = {"-h", "--help", "--help-all"}


def top_parser() -> CommandParser:
    parser = CommandParser(prog="gpo-trl", description="Generalized Preference Optimization on TRL.",
                           epilog="Options are spelt --snake_case or --kebab-case alike. `gpo-trl COMMAND --help` "
                           "describes a command.")
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("--verbose", action="store_true", help="show the library warnings gpo-trl holds back and "
                        "log at info level (also: GPO_TRL_VERBOSE=1)")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                        help="; ".join(f"{name}: {what}" for name, what in COMMANDS.items()))
    return parser


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"gpo-trl {__version__} (trl {installed('trl')}, transformers {installed('transformers')})"


def command_help(command: str, argv: list[str]) -> int:
    """`gpo-trl COMMAND --help`, from the light parsers (train: GPO's keys first; --help-all: every key)."""
    if command == "train":
        from .train_help import format_train_help

        print(format_train_help())
        if "--help-all" in argv:
            from .recipe import make_parser

            print("\nEvery key (GPO's, TRL's, transformers'):\n")
            make_parser(prog="gpo-trl train").print_help()
        return 0
    if command == "evaluate" and ("--generate" in argv or "--compare" in argv):
        parser = generate_eval_parser()
    else:
        parser = {"evaluate": evaluate_parser, "push": push_parser, "merge": merge_parser, "sweep": sweep_parser,
                  "iterate": iterate_parser, "study": study_parser, "losses": losses_parser}[command]()
    parser.print_help()
    return 0


def take_global_flags(argv: list[str]) -> list[str]:
    """`--verbose` may stand anywhere before a bare `--`; it is taken out and applied here (gpo_trl.quiet)."""
    head = argv[:argv.index("--")] if "--" in argv else argv
    if "--verbose" not in head:
        return argv
    from .quiet import set_verbose

    set_verbose()
    index = argv.index("--verbose")
    return argv[:index] + argv[index + 1:]


def main(argv: list[str] | None = None) -> int:
    argv = take_global_flags(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv[:1])  # --help, --version, or an error naming the commands (exit 2)
    command, rest = argv[0], argv[1:]
    if _HELP & set(rest[:rest.index("--")] if "--" in rest else rest):
        return command_help(command, rest)
    if command == "train" and not rest:
        from .train_help import USAGE

        print(f"{USAGE}\ngpo-trl train: error: a recipe is needed, e.g. `gpo-trl train --config configs/demo.yaml`; "
              "`gpo-trl train --help` lists the keys.", file=sys.stderr)
        return 2
    commands = {"train": train, "evaluate": evaluate, "push": push, "sweep": sweep, "study": study,
                "losses": losses, "merge": merge, "iterate": iterate}
    try:
        return commands[command](rest)
    except (ConfigError, DataError) as err:
        print(f"gpo-trl: {type(err).__name__}:\n{err}", file=sys.stderr)
        return 2
    except JudgeError as err:
        print(f"gpo-trl: {type(err).__name__}:\n{err}", file=sys.stderr)
        return 1
    except PushError as err:
        print(f"gpo-trl: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
