"""Shared fixtures: tiny models built from a config and saved to a temp dir, and small preference datasets.

Nothing is downloaded: HF_HUB_OFFLINE=1 is set before transformers/datasets are imported, and every model is a
randomly initialised config saved with save_pretrained, then loaded back by path, like a Hub model.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # `-n 2`: one core per worker, for it and the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"
# Tests never write to the user's datasets cache (load_dataset's arrow files, and the default reference log-probs
# cache `<datasets cache>/gpo_trl_ref_logps` of every test that precomputes without its own ref_logps_cache_dir):
# this process and every subprocess it starts use a temporary one, removed at exit. Set before datasets is imported.
TEST_DATASETS_CACHE = tempfile.mkdtemp(prefix="gpo_trl_tests_datasets_cache_")
os.environ["HF_DATASETS_CACHE"] = TEST_DATASETS_CACHE
atexit.register(shutil.rmtree, TEST_DATASETS_CACHE, ignore_errors=True)

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from gpo_trl.demo import make_demo_pairs, save_tiny_model  # noqa: E402

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def zen_rows() -> list[dict]:
    """TRL's zen preference sample (standard format, explicit prompt), from shared/data/trl_zen."""
    return read_jsonl(DATA / "zen_standard_preference" / "train.jsonl")


@pytest.fixture(scope="session")
def demo_rows() -> dict[str, list[dict]]:
    return make_demo_pairs(seed=0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, zen_rows, demo_rows):
    """{architecture: path} of tiny llama / qwen2 / gpt2 models whose tokenizer covers zen + demo text."""
    texts = [r[k] for r in zen_rows for k in ("prompt", "chosen", "rejected")]
    texts += [r[k] for rows in demo_rows.values() for r in rows for k in ("prompt", "chosen", "rejected")]
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(root / arch, arch, texts, seed=0) for arch in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def zen_dataset(zen_rows) -> Dataset:
    return Dataset.from_list(zen_rows)


@pytest.fixture(scope="session")
def demo_datasets(demo_rows) -> dict[str, Dataset]:
    return {name: Dataset.from_list(rows) for name, rows in demo_rows.items()}


def console_script(name: str) -> str:
    """The installed console script next to this interpreter (a venv's or pyenv's bin), else the name on PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def cpu_args(**overrides) -> dict:
    """Training arguments for fast deterministic float32 CPU runs."""
    args = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[], seed=0, save_strategy="no",
                logging_steps=1, per_device_train_batch_size=4, dataloader_num_workers=0, max_length=64,
                learning_rate=1e-2, disable_tqdm=True)
    args.update(overrides)
    return args


def logged_steps(trainer) -> list[dict]:
    """The per-step training logs (those with a `loss`), in order."""
    return [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]


def python_stacks(pid: int) -> str:
    """py-spy's dump of a process and its children: where a hung run waits."""
    import subprocess

    import psutil

    dumps = []
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            dump = subprocess.run(["py-spy", "dump", "--native", "--pid", str(process.pid)], capture_output=True,
                                  text=True, timeout=60)
            dumps.append(dump.stdout or dump.stderr)
        except (OSError, subprocess.TimeoutExpired) as err:
            dumps.append(f"{process.pid}: no stack ({err})")
    return "\n".join(dumps)


def launch_two_ranks(script: str, model, tmp_path, *script_args, timeout=240):
    """`accelerate launch` 2 gloo processes of a script in tests/ on a free port; kill them all if they hang."""
    import socket
    import subprocess

    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tests = DATA.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "gpo_trl" / "accelerate_configs" / "cpu_ddp.yaml"), "--main_process_port", str(port),
               str(tests / script), *script_args, str(model), str(tmp_path)]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = python_stacks(process.pid)
        workers = psutil.Process(process.pid).children(recursive=True)  # torch's launcher gives each its own session
        for worker in [*workers, psutil.Process(process.pid)]:
            worker.kill()
        out, err = process.communicate()
        pytest.fail(f"the ranks hung (no result in {timeout} s):\n--- stacks ---\n{stacks}\n--- stderr (end) ---\n"
                    f"{err[-3000:]}")
    assert process.returncode == 0, err[-3000:]
    [line] = [line for line in out.splitlines() if line.startswith("RANKS ")]
    return sorted(json.loads(line[len("RANKS "):]), key=lambda entry: entry["rank"]), err
