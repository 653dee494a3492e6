"""The `gpo-trl` command, run as a user runs it: a subprocess, a YAML recipe, overrides, `accelerate launch`."""

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import console_script, python_stacks

REPO = Path(__file__).parent.parent
DEMO = str(REPO / "configs" / "demo.yaml")


def gpo_trl(*args, cwd, timeout=300, launcher=None):
    """Run the command; one still running after `timeout` s fails the test with the Python stacks of its processes
    (py-spy), then is killed."""
    launcher = launcher or (console_script("gpo-trl"),)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [*launcher, *args]
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = python_stacks(proc.pid)
            for process in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"{shlex.join(command[1:3])} still running after {timeout} s.\n--- stacks ---\n{stacks}\n"
                        f"--- stdout (end) ---\n{stdout[-3000:]}\n--- stderr (end) ---\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def demo_paths(tmp_path) -> list[str]:
    """Overrides that keep a demo run's assets and outputs inside the test's temp dir."""
    return ["--model_name_or_path", str(tmp_path / "assets" / "model"), "--dataset_name",
            str(tmp_path / "assets" / "data"), "--output_dir", str(tmp_path / "out")]


def summary_value(output: str, label: str) -> tuple[float, float]:
    """(before, after) from a summary row such as `  reward accuracy  0.0000  0.9844`."""
    match = re.search(rf"^\s+{label}\s+(-?[\d.]+)\s+(-?[\d.]+)\s*$", output, re.MULTILINE)
    assert match, f"no {label!r} row in:\n{output}"
    return float(match.group(1)), float(match.group(2))


def test_a_hung_command_fails_with_the_stacks_of_its_processes(tmp_path):
    """The helper above: a command still running at its timeout fails the test with py-spy's stacks, child included."""
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(600)'])"
    with pytest.raises(pytest.fail.Exception) as failure:
        gpo_trl("-c", child, cwd=tmp_path, timeout=5, launcher=(sys.executable,))
    message = str(failure.value)
    assert "still running after 5 s" in message
    assert message.count("Thread ") >= 2 and "sleep" in message  # both processes' stacks, the child's in time.sleep


def test_losses_table():
    result = gpo_trl("losses", cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "f(t)", "f'(0)", "f''(0)", "c_f", "convex"]
    rows = {line.split()[0]: line for line in lines[2:8]}
    assert set(rows) == {"logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage"}
    assert rows["logistic"].split()[-4:] == ["-0.5", "0.25", "0.25", "yes"]
    assert rows["savage"].split()[-4:] == ["-0.25", "0.125", "0.25", "no"]


def test_python_dash_m_is_the_same_command():
    result = gpo_trl("losses", cwd=REPO, launcher=(sys.executable, "-m", "gpo_trl"))
    assert result.returncode == 0 and "truncated_quadratic" in result.stdout


def test_typo_fails_before_anything_is_loaded(tmp_path):
    started = time.time()
    result = gpo_trl("train", "--config", DEMO, *demo_paths(tmp_path), "--bta", "0.3", cwd=tmp_path)
    assert result.returncode == 2
    assert "Unknown key 'bta' in the command line. Did you mean 'beta'?" in result.stderr
    assert not (tmp_path / "assets").exists(), "the demo assets were built although the recipe was invalid"
    assert time.time() - started < 60


def test_unknown_accelerate_config_name(tmp_path):
    result = gpo_trl("train", "--config", DEMO, "--accelerate_config", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "'nope' is neither a file nor one of the shipped configs" in result.stderr


@pytest.mark.slow
def test_demo_learns_on_held_out_topics(tmp_path):
    """The quickstart's main job: under 2 minutes on 2 cores, a progress bar, a summary, an adapter on disk,
    and held-out reward accuracy clearly above chance (0.5)."""
    started = time.time()
    env_without_tqdm_disable = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    command = [console_script("gpo-trl"), "train", "--config", DEMO, *demo_paths(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path,
                            env={**env_without_tqdm_disable, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=300)
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 120, f"demo took {elapsed:.0f}s"
    assert "it/s]" in result.stderr or "s/it]" in result.stderr  # tqdm progress bar
    _, accuracy = summary_value(result.stdout, "reward accuracy")
    loss_before, loss_after = summary_value(result.stdout, "held-out loss")
    margin_before, margin_after = summary_value(result.stdout, "reward margin")
    assert accuracy >= 0.8 and loss_after < loss_before and margin_after > margin_before
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert f"written to {tmp_path / 'out'}" in result.stdout
    # Quiet: no warning of any kind on stderr (progress bars only); stdout is the data check, the logged metrics
    # (one dict per logging_steps) and the summary, as the docs show it.
    assert not warning_lines(result.stderr), warning_lines(result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0] == "Data check:" and lines[-1] == f"Model/adapter written to {tmp_path / 'out'}"
    assert sum(line.startswith("{'") for line in lines) == 10 and len(lines) == 3 + 10 + 8


@pytest.mark.slow
def test_entry_script_runs_directly_under_accelerate_launch(tmp_path):
    args = [str(REPO / "scripts" / "train.py"), "--config", DEMO, *demo_paths(tmp_path), "--max_steps", "2",
            "--gpo_loss", "savage", "--eval_before_training", "false"]
    accelerate = (console_script("accelerate"),)
    result = gpo_trl("launch", "--num_processes", "1", *args, cwd=tmp_path, launcher=accelerate)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss 'savage'" in result.stdout and "2 steps, world size 1" in result.stdout


def test_launch_args_pick_a_free_port_and_imply_multi_gpu():
    """Two local jobs must not share accelerate's default port 29500; a config or flag that sets one wins."""
    from gpo_trl.cli import accelerate_launch_args, split_launch_args

    launch, recipe = split_launch_args(["--config", "r.yaml", "--num_processes", "2", "--beta=0.2"])
    assert recipe == ["--config", "r.yaml", "--beta=0.2"]
    args = accelerate_launch_args(launch)
    assert "--multi_gpu" in args and args[args.index("--num_processes") + 1] == "2"
    port = int(args[args.index("--main_process_port") + 1])
    assert port != 29500 and port > 0
    assert accelerate_launch_args(["--main_process_port", "1234"]).count("--main_process_port") == 1
    with_config = accelerate_launch_args(["--accelerate_config", "cpu_ddp"])
    assert "--main_process_port" in with_config and "--multi_gpu" not in with_config


def test_help_and_config_errors_do_not_import_the_training_stack():
    """`gpo-trl --help` and a bad launch option answer without importing torch, transformers or TRL (measured: 0.3 s
    instead of 16 s on this machine); the recipe's own check still needs them, and loads them."""
    probe = ("import sys\nfrom gpo_trl.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
             "    print('loaded:', sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    help_ = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, cwd=REPO)
    assert "usage: gpo-trl" in help_.stdout and "loaded: []" in help_.stdout, help_.stderr
    for bad_option, message in (("--num_processes", "`--num_processes` needs a value."),
                                ("--accelerate_config=nope", "'nope' is neither a file nor one of the shipped")):
        bad = subprocess.run([sys.executable, "-c", probe, "train", "--config", DEMO, bad_option], capture_output=True,
                             text=True, cwd=REPO)
        assert message in bad.stderr and "loaded: []" in bad.stdout, bad.stderr


def test_a_trl_of_another_minor_version_is_refused_at_import():
    """GPOTrainer mirrors TRL 1.16 internals: with another minor installed, `import gpo_trl` fails and says which
    TRL to install. (The installed version is read from the distribution's metadata; here that answer is changed.)"""
    probe = ("import importlib.metadata as m; real = m.version; "
             "m.version = lambda name: '1.17.0' if name == 'trl' else real(name); import gpo_trl")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "gpo_trl was tested with trl 1.16.x, but trl 1.17.0 is installed" in result.stderr
    assert "pip install 'trl>=1.16,<1.17'" in result.stderr


def test_commands_print_no_bitsandbytes_kernel_warning(tmp_path):
    """bitsandbytes' optional-kernel warning (logged when peft imports it) stays out of commands that load no 4-bit
    model; it is kept for the line a 4-bit run prints (tested with the QLoRA merge in tests/test_merge.py). The
    command is a recipe check, which imports peft (`--help` no longer imports it at all)."""
    result = gpo_trl("train", "--config", DEMO, "--bta", "0.3", cwd=tmp_path)
    assert result.returncode == 2 and "Unknown key 'bta'" in result.stderr
    output = result.stdout + result.stderr
    assert "gemm_4bit_forward" not in output and "kernels-community" not in output, output
    from gpo_trl.fourbit import describe_4bit_kernel

    line = describe_4bit_kernel("cpu")
    assert line.startswith("4-bit layers: bitsandbytes") and "CPU kernels" in line


# --- Conventions: help, version, flag spellings (issue 23) ---

LIGHT_PROBE = ("import sys, time\nstarted = time.time()\nfrom gpo_trl.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
               "except SystemExit as exit_:\n    code = exit_.code\nprint('seconds:', round(time.time() - started, 3))\n"
               "print('loaded:', sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))\n"
               "sys.exit(code)")


def light(*args):
    """Run `gpo-trl ARGS` in a fresh interpreter; report its time (import of the CLI included) and heavy imports."""
    started = time.time()
    result = subprocess.run([sys.executable, "-c", LIGHT_PROBE, *args], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    return result, time.time() - started


@pytest.mark.parametrize("command", [["train"], ["evaluate"], ["evaluate", "--generate"], ["evaluate", "--compare"],
                                     ["push"], ["merge"], ["sweep"], ["iterate"], ["study"], ["losses"], []])
def test_every_help_answers_fast_without_the_training_stack(command):
    """`gpo-trl [COMMAND] --help` exits 0 with a usage, in under 2 s (interpreter start included), importing neither
    torch, transformers nor TRL. (`evaluate --help` used to exit 2; each command's help took 7-14 s.)"""
    result, seconds = light(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gpo-trl"), result.stdout[:200]
    assert "loaded: []" in result.stdout
    assert seconds < 2, f"{command} --help took {seconds:.1f}s"
    prog = " ".join(["gpo-trl", *command[:1]])
    assert prog in result.stdout.splitlines()[0]


def test_train_help_leads_with_config_and_gpo_keys():
    result, _ = light("train", "--help")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: gpo-trl train --config RECIPE.yaml")
    text = result.stdout
    assert text.index("--config RECIPE.yaml") < text.index("--gpo_loss") < text.index("--prepare_demo_assets") \
        < text.index("--invalid_rows") < text.index("Launch options")
    assert "--help-all" in text and len(lines) < 150  # was 1009 lines, GPO's keys from line 873


def test_train_help_all_adds_every_key(capsys):
    from gpo_trl.cli import main

    assert main(["train", "--help-all"]) == 0
    text = capsys.readouterr().out
    assert text.index("--gpo_loss") < text.index("Every key")
    assert "--per_device_train_batch_size" in text[text.index("Every key"):]
    assert "--lr_scheduler_type" in text and "--lora_target_modules" in text


def test_train_help_keys_are_the_dataclasses_own():
    """The --help key list is generated (python -m gpo_trl.train_help); it must equal what the dataclasses say now,
    and the often-set TRL keys it names must exist. The merge dtypes in its help are merge's own."""
    from gpo_trl import train_help
    from gpo_trl.cli import MERGE_TOLERANCES
    from gpo_trl.merge import TOLERANCES
    from gpo_trl.recipe import make_parser

    assert train_help.KEYS == train_help.generate_keys(), "run `python -m gpo_trl.train_help` to regenerate"
    dests = {action.dest for action in make_parser()._actions}
    assert set(train_help.COMMON_TRL_KEYS) <= dests
    assert {name for keys in train_help.KEYS.values() for name, *_ in keys} <= dests
    assert MERGE_TOLERANCES == TOLERANCES


def test_bare_train_prints_a_short_usage_and_exits_2():
    result, _ = light("train")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: gpo-trl train --config") and len(result.stderr.splitlines()) <= 4
    assert "gpo-trl train --config configs/demo.yaml" in result.stderr and "loaded: []" in result.stdout


def test_version():
    from gpo_trl import __version__

    result, seconds = light("--version")
    assert result.returncode == 0 and seconds < 2
    assert result.stdout.startswith(f"gpo-trl {__version__} (trl 1.16.")


def test_every_option_takes_both_spellings():
    """Each command's options parse the same spelt --snake_case and --kebab-case (as HfArgumentParser does for the
    recipe keys); --emit-slurm and --emit_slurm alike."""
    from gpo_trl import cli

    for build in (cli.evaluate_parser, cli.generate_eval_parser, cli.push_parser, cli.merge_parser,
                  cli.sweep_parser, cli.iterate_parser, cli.study_parser):
        parser = build()
        for action in parser._actions:
            option = next((o for o in action.option_strings if o.startswith("--") and o != "--help"), None)
            if option is None or "_" not in option and "-" not in option[2:]:
                continue
            value = [] if action.nargs == 0 else ["1" if action.type is int else "v"]
            snake, kebab = "--" + cli.canonical(option), "--" + cli.canonical(option).replace("_", "-")
            required = [o for a in parser._actions if a.required and a is not action for o in a.option_strings[:1]]
            fill = [item for o in required for item in (o, "v")]
            assert (vars(parser.parse_known_args([*fill, snake, *value])[0])
                    == vars(parser.parse_known_args([*fill, kebab, *value])[0])), (parser.prog, option)
    args = cli.sweep_parser().parse_args(["--config", "s.yaml", "--emit_slurm", "DIR"])
    assert args.emit_slurm == "DIR" and cli.sweep_parser().parse_args(["--config", "s.yaml", "--emit-slurm",
                                                                       "DIR"]).emit_slurm == "DIR"
    own, rest = cli.evaluate_parser().parse_known_args(["--adapter-path", "A", "--metrics-file", "m.json",
                                                        "--per-device-eval-batch-size", "2"])
    assert (own.adapter_path, own.metrics_file, rest) == ("A", "m.json", ["--per-device-eval-batch-size", "2"])


def test_launch_options_take_accelerate_spellings():
    from gpo_trl.cli import split_launch_args

    launch, recipe = split_launch_args(["--config", "r.yaml", "--num-processes", "2", "--config_file", "cpu_ddp",
                                        "--main-process-port=1234", "--gpo-loss", "hinge"])
    assert launch == ["--num_processes", "2", "--accelerate_config", "cpu_ddp", "--main_process_port", "1234"]
    assert recipe == ["--config", "r.yaml", "--gpo-loss", "hinge"]


def test_an_unknown_option_gets_a_suggestion():
    result, _ = light("merge", "--adapter_pth", "a", "--output-dir", "o")
    assert result.returncode == 2 and "unknown option --adapter_pth. Did you mean `--adapter_path`?" in result.stderr
    result, _ = light("sweep", "--config", "s.yaml", "--emit-slurms", "d")
    assert result.returncode == 2 and "Did you mean `--emit_slurm`?" in result.stderr


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if re.search(r"Warning\b|warnings\.warn|is deprecated|Skipping publisher trust", line)]


@pytest.mark.slow
def test_quiet_by_default_and_verbose_brings_the_library_lines_back(tmp_path):
    """With activation checkpointing on, peft and TRL 1.16 call transformers' deprecated `*gradient_checkpointing*`
    names; gpo_trl's own configs and calls use the new ones. Default: no warning line; --verbose: they are back."""
    args = ["train", "--config", DEMO, *demo_paths(tmp_path), "--max_steps", "1", "--eval_before_training", "false",
            "--activation-checkpointing", "true"]
    quiet = gpo_trl(*args, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not warning_lines(quiet.stderr), warning_lines(quiet.stderr)
    verbose = gpo_trl("--verbose", *args, cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in verbose.stderr
    assert "Skipping publisher trust check" in verbose.stderr and "Failed to load CPU gemm_4bit_forward" \
        in verbose.stderr  # offline mode, as in these tests: the optional kernel's lines
    assert "`activation_checkpointing` instead" not in verbose.stderr  # gpo_trl's own configs: the new name
