"""Hub models and datasets without the Hub (gpo_trl.reach): a few lines naming the id, the cause and the way out,
within seconds, before anything heavy loads. The network is made unreachable deterministically: HF_ENDPOINT points
at a local port nothing listens on (connection refused), and HF_HOME at an empty folder (nothing cached)."""

import os
import socket
import subprocess
import time

import pytest

from conftest import REPO, console_script
from gpo_trl.errors import MissingInputError

RECIPE = str(REPO / "configs" / "recipes" / "qwen2.5-0.5b-lora-ultrafeedback.yaml")
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # released on close: nothing listens there afterwards


def train(tmp_path, env_changes, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                               "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update({"HF_HOME": str(tmp_path / "hf"), **env_changes})
    started = time.time()
    result = subprocess.run([console_script("gpo-trl"), "train", "--config", RECIPE, "--use_cpu", "true",
                             "--output_dir", str(tmp_path / "out"), *extra], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    return result, time.time() - started


def assert_short_answer(result, seconds, cause):
    assert result.returncode == 2, result.stderr[-2000:]
    assert seconds < 20, f"took {seconds:.0f}s"
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 4, result.stderr
    assert f"Model '{MODEL}' cannot be loaded" in result.stderr and cause in result.stderr
    assert f"hf download {MODEL} --local-dir DIR" in result.stderr and "`model_name_or_path: DIR`" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "~/.cache/huggingface/hub" in result.stderr


def test_offline_mode_names_the_model_and_says_so(tmp_path):
    """Was: 104 lines of traceback that never named the model."""
    result, seconds = train(tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert_short_answer(result, seconds, "offline mode is on (HF_HUB_OFFLINE=1)")


def test_unreachable_hub_names_the_model_and_says_so(tmp_path):
    """Was: 46 s of retries, then a 91-line traceback."""
    port = closed_port()
    result, seconds = train(tmp_path, {"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert_short_answer(result, seconds, f"there is no network access to the Hub (http://127.0.0.1:{port}")


@pytest.mark.slow
def test_a_cached_model_trains_without_the_network(tmp_path):
    """A model in the Hub cache, the Hub unreachable: one line says so, the run goes offline and trains (before
    the check, transformers and peft retried every file: 2 min 42 s for 2 steps of a tiny model)."""
    from gpo_trl.demo import prepare_demo_assets

    prepare_demo_assets(str(tmp_path / "model"), str(tmp_path / "data"), seed=0)
    repo = tmp_path / "hf" / "hub" / "models--gpo-tests--tiny"
    (repo / "snapshots").mkdir(parents=True)
    (tmp_path / "model").rename(repo / "snapshots" / "0")  # the cache layout: snapshots/<commit>, refs/main
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update({"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    demo = str(REPO / "configs" / "demo.yaml")
    started = time.time()
    result = subprocess.run([console_script("gpo-trl"), "train", "--config", demo, "--model_name_or_path",
                             "gpo-tests/tiny", "--dataset_name", str(tmp_path / "data"), "--max_steps", "2",
                             "--output_dir", str(tmp_path / "out"), "--eval_before_training", "false",
                             "--prepare_demo_assets", "false"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no network access to the Hub" in result.stderr and "using the cached copy of 'gpo-tests/tiny'" \
        in result.stderr
    assert time.time() - started < 90 and "Retrying" not in result.stderr


def test_a_dataset_id_offline_and_a_cached_one(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from gpo_trl.reach import HubAccessError, check_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubAccessError) as err:
        check_source("gpo-tests/no-such-data", "dataset")
    message = str(err.value)
    assert message.startswith("Dataset 'gpo-tests/no-such-data' cannot be loaded") and "offline mode is on" in message
    assert "--repo-type dataset" in message and "HF_DATASETS_CACHE" in message
    (tmp_path / "hub" / "datasets--gpo-tests--cached" / "snapshots" / "abc").mkdir(parents=True)
    check_source("gpo-tests/cached", "dataset")  # in the cache: fine offline


def test_local_paths_and_missing_files(tmp_path, monkeypatch):
    from gpo_trl.inputs import check_data_files
    from gpo_trl.reach import HubAccessError, check_source

    monkeypatch.chdir(tmp_path)
    check_source(str(tmp_path), "model")  # an existing path is used as is, without asking the Hub
    with pytest.raises(HubAccessError, match="neither an existing path .* nor a valid Hub id"):
        check_source("runs/demo/assets/not-there", "model")
    (tmp_path / "here.jsonl").write_text("{}\n")
    check_data_files({"train": "here.jsonl", "test": ["*.jsonl"]})
    with pytest.raises(MissingInputError, match=f"data file prompts.jsonl does not exist .* working directory, {tmp_path}"):
        check_data_files(["here.jsonl", "prompts.jsonl"])


def test_a_missing_data_file_is_named_where_data_and_prompts_load(tmp_path, monkeypatch):
    """Training sources and iterate/generate prompts: one line naming the file and the directory, not datasets'
    40-line traceback."""
    from gpo_trl.data import PreferenceSource, load_source
    from gpo_trl.online.generation import load_prompts

    monkeypatch.chdir(tmp_path)
    source = PreferenceSource(path="json", data_files="prompts.jsonl")
    for load in (load_source, load_prompts):
        with pytest.raises(MissingInputError, match="data file prompts.jsonl does not exist .* not against the YAML file"):
            load(source)


def test_the_early_model_check_reads_overrides_after_bare_flags(tmp_path, monkeypatch):
    """`gpo-trl train`'s first check reads the model the recipe will use: a bare `--flag` before
    `--model_name_or_path DIR` takes no value (it used to swallow the next token, so the YAML's model was checked),
    a `--config=PATH` is read, and a recipe that is not a mapping is left to the recipe parser (no TypeError)."""
    from gpo_trl.reach import HubAccessError, check_model_early

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "r.yaml").write_text("model_name_or_path: nobody-has/this-model\n")
    check_model_early(["--config", "r.yaml", "--bf16", "--model_name_or_path", "./local"])
    for argv in (["--config", "r.yaml", "--bf16"], ["--config=r.yaml"]):
        with pytest.raises(HubAccessError, match="nobody-has/this-model"):
            check_model_early(argv)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    check_model_early(["--config", "list.yaml"])
