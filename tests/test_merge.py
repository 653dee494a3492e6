"""`gpo-trl merge`: LoRA and QLoRA adapters from tiny real runs, merged, reloaded with plain transformers, and
checked here independently: the merged weights against W + (alpha / r) B A from the saved files, and the log-probs
of held-out demo rows against the adapter on its base. A refused check or a failed push leaves OUT as it was."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpo_trl.cli import main as cli
from gpo_trl.hub import PushError
from gpo_trl.merge import merge_adapter
from gpo_trl.recipe import main as recipe_main
from test_pipeline import demo_args, fake_hub  # noqa: F401  (fake_hub is a fixture: the Hub client intercepted)

QLORA = ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", "true",
         "--dtype", "bfloat16"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora")
    recipe_main(*demo_args(tmp_path))
    return tmp_path


def held_out_log_probs(model, tokenizer, rows) -> torch.Tensor:
    """Per-token log-probs of prompt + chosen for the demo's held-out rows (the test's own computation)."""
    texts = [row["prompt"] + row["chosen"] for row in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    values = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return values[batch["attention_mask"][:, 1:].bool()]


def assert_merged_equals_adapter(run, out, base_path):
    """Weights: merged = W0 + (alpha / r) B A for every LoRA pair, everything else untouched. Log-probs on held-out
    rows: merged (plain AutoModelForCausalLM) = adapter on the float32 base, within 1e-5 per token."""
    adapter_dir = run / "out"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    merged_state = merged.state_dict()
    assert not any("lora_" in name for name in merged_state)
    base_state = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).state_dict()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    updated = set()
    for name in (n for n in lora if n.endswith("lora_A.weight")):
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = lora[name].float(), lora[name.replace("lora_A", "lora_B")].float()
        expected = base_state[f"{module}.weight"] + scaling * b @ a
        torch.testing.assert_close(merged_state[f"{module}.weight"], expected, rtol=0, atol=1e-6)
        updated.add(f"{module}.weight")
    assert len(updated) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name in set(merged_state) - updated:
        assert torch.equal(merged_state[name], base_state[name]), name

    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in (run / "assets" / "data" / "test.jsonl").read_text().splitlines()[:8]]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                          adapter_dir).eval()
    diff = (held_out_log_probs(merged, tokenizer, rows) - held_out_log_probs(reference, tokenizer, rows)).abs()
    assert diff.max() < 1e-5, diff.max()
    return merged


def test_lora_merge_equals_the_adapter_and_carries_the_gpo_card(lora_run, capsys):
    out = lora_run / "merged"
    assert cli(["merge", "--adapter_path", str(lora_run / "out"), "--output_dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert "Check: merged vs adapter-on-base log-probs on 4 probe texts" in log and "Note:" not in log
    assert_merged_equals_adapter(lora_run, out, lora_run / "assets" / "model")
    card = (out / "README.md").read_text()
    for expected in (f"`{lora_run / 'assets' / 'data'}`", "GPO loss: `logistic`, f(t) = `log(1 + exp(-t))`",
                     "beta = 0.1, effective beta = 0.1", "quantisation in training: none", "## Merge",
                     "PEFT `merge_and_unload` onto the base loaded in float32", "tolerance 1e-05"):
        assert expected in card, expected
    record = json.loads((out / "gpo_merge.json").read_text())
    assert record["check"]["max_abs_diff"] <= 1e-5
    assert [p.name for p in lora_run.iterdir() if p.name.startswith(".merged.")] == []  # no staging, lock or backup


def test_bfloat16_merge_within_its_bound_and_a_failed_check_writes_nothing(lora_run, capsys):
    """bfloat16 rounds the merged weights: the log-probs move by more than float32's 1e-5 but stay within the bf16
    bound (0.1); with a bound of 1e-7 the same merge is refused and nothing is written."""
    assert cli(["merge", "--adapter_path", str(lora_run / "out"), "--output_dir", str(lora_run / "bf16"),
                "--dtype", "bfloat16"]) == 0
    measured = json.loads((lora_run / "bf16" / "gpo_merge.json").read_text())["check"]["max_abs_diff"]
    assert 1e-5 < measured <= 0.1
    assert AutoModelForCausalLM.from_pretrained(lora_run / "bf16").dtype == torch.bfloat16
    out = lora_run / "refused"
    code = cli(["merge", "--adapter_path", str(lora_run / "out"), "--output_dir", str(out), "--dtype", "bfloat16",
                "--tolerance", "1e-7"])
    assert code == 1 and "nothing was written" in capsys.readouterr().err
    assert not out.exists()


def test_bad_inputs_fail_before_loading(lora_run, capsys):
    assert cli(["merge", "--adapter_path", str(lora_run / "assets"), "--output_dir", str(lora_run / "x")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert cli(["merge", "--adapter_path", str(lora_run / "out"), "--output_dir", str(lora_run / "assets")]) == 2
    assert "holds files gpo-trl did not write there (data, model)" in capsys.readouterr().err
    assert cli(["merge", "--adapter_path", str(lora_run / "out"), "--output_dir", str(lora_run / "y"),
                "--push_to_hub"]) == 2
    assert "needs `--hub_model_id" in capsys.readouterr().err


def test_push_uploads_the_merged_model_and_a_failed_push_keeps_out(lora_run, fake_hub):  # noqa: F811
    out = lora_run / "pushed"
    hub = fake_hub()
    merge_adapter(str(lora_run / "out"), str(out), push_to_hub=True, hub_model_id="me/gpo-merged")
    [upload] = hub.uploads
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= upload["files"]
    assert "adapter_config.json" not in upload["files"] and ".gpo-trl" not in upload["files"]
    assert 'from_pretrained("me/gpo-merged")' in upload["card"] and "GPO loss: `logistic`" in upload["card"]

    fake_hub(fail_upload=ConnectionError("network unreachable"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(PushError, match="run is intact"):
        merge_adapter(str(lora_run / "out"), str(out), push_to_hub=True, hub_model_id="me/gpo-merged")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after.keys() == before.keys() and after["model.safetensors"] == before["model.safetensors"]
    AutoModelForCausalLM.from_pretrained(out)  # still a whole model


@pytest.mark.slow
def test_qlora_adapter_merges_onto_the_full_precision_base(tmp_path, capsys):
    recipe_main(*demo_args(tmp_path, *QLORA))
    log = capsys.readouterr().out
    assert "4-bit layers: bitsandbytes' built-in CPU kernels" in log  # the run says which 4-bit kernel it uses
    assert json.loads((tmp_path / "out" / "gpo_run.json").read_text())["quantization"] == "4-bit"
    out = tmp_path / "merged"
    assert cli(["merge", "--adapter_path", str(tmp_path / "out"), "--output_dir", str(out)]) == 0
    assert "trained on a 4-bit quantised base. It is merged onto" in capsys.readouterr().out
    merged = assert_merged_equals_adapter(tmp_path, out, tmp_path / "assets" / "model")
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    assert "quantisation in training: 4-bit" in (out / "README.md").read_text()


def snapshot(folder) -> dict | None:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else None


def test_a_merge_killed_at_any_file_operation_leaves_the_old_or_the_new_model(lora_run):
    """Replacing a float32 merge with a bfloat16 one, crashed before each file operation in turn (gpo_trl.atomic's
    injected crash: no cleanup runs, as under SIGKILL): OUT is the old merge or the new one byte for byte (never
    the new gpo_merge.json with the old weights), or missing between the two renames; the same command then
    finishes with no cleanup by hand."""
    from gpo_trl.atomic import SimulatedCrash, inject_fault

    out = lora_run / "crashed"
    old_args, new_args = dict(dtype="float32"), dict(dtype="bfloat16")
    merge_adapter(str(lora_run / "out"), str(out), log=lambda *_: None, **new_args)
    new = snapshot(out)
    merge_adapter(str(lora_run / "out"), str(out), log=lambda *_: None, **old_args)
    old = snapshot(out)
    assert old["model.safetensors"] != new["model.safetensors"]
    with inject_fault() as labels:
        merge_adapter(str(lora_run / "out"), str(out), log=lambda *_: None, **new_args)
    assert snapshot(out) == new
    outcomes = []
    for n in range(1, len(labels) + 1):
        merge_adapter(str(lora_run / "out"), str(out), log=lambda *_: None, **old_args)
        with inject_fault(at=n), pytest.raises(SimulatedCrash):
            merge_adapter(str(lora_run / "out"), str(out), log=lambda *_: None, **new_args)
        state = snapshot(out)
        assert state in (old, new) or (state is None and labels[n - 1].startswith("swap 2")), labels[n - 1]
        outcomes.append("old" if state == old else "new" if state == new else "missing")
        merge_adapter(str(lora_run / "out"), str(out), log=lambda *_: None, **new_args)  # the rerun
        assert snapshot(out) == new
        assert sorted(p.name for p in lora_run.iterdir() if p.name.startswith(".crashed.")) == []
    assert {"old", "new", "missing"} == set(outcomes), (labels, outcomes)


@pytest.mark.slow
def test_a_merge_process_killed_between_its_renames_is_finished_by_the_same_command(lora_run):
    """A real process exits at once (GPO_TRL_FAULT_AT: os._exit(137), no cleanup, as SIGKILL) just before the
    second rename: OUT is missing and its previous version waits in the backup. Rerunning the same command puts the
    previous version back, then writes the new merge, with no cleanup by hand."""
    import os
    import subprocess

    from conftest import console_script

    out = lora_run / "killed"
    command = [console_script("gpo-trl"), "merge", "--adapter_path", str(lora_run / "out"), "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command + ["--dtype", "bfloat16"], env=env, check=True, capture_output=True)
    killed = subprocess.run(command, env={**env, "GPO_TRL_FAULT_AT": "7"}, capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not out.exists() and [p.name for p in lora_run.glob(".killed.gpo-old-*")]  # between the two renames
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((out / "gpo_merge.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in lora_run.iterdir() if p.name.startswith(".killed.")) == []
    AutoModelForCausalLM.from_pretrained(out)
