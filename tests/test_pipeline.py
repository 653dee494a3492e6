"""The training pipeline around the loss: QLoRA, the Hub (client intercepted, nothing sent), resuming, trackers,
`gpo-trl evaluate`, and the shipped accelerate configs. Everything else here runs for real."""

import csv
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import AutoPeftModelForCausalLM, LoraConfig
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig

from conftest import DATA, REPO, cpu_args, logged_steps
from gpo_trl import GPOConfig, GPOTrainer
from gpo_trl.data import DataError
from gpo_trl.cli import main as cli
from gpo_trl.hub import PushError
from gpo_trl.recipe import main as recipe_main
from gpo_trl.recipe import parse_args

DEMO = str(REPO / "configs" / "demo.yaml")


def lora():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.mark.parametrize(
    "quantization",
    [BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16),
     BitsAndBytesConfig(load_in_8bit=True)],
    ids=["4bit-nf4-double-quant", "8bit"],
)
def test_qlora_trains_saves_and_reloads(quantization, tiny_models, zen_dataset, tmp_path):
    """bitsandbytes loads the base in 4/8 bit on the CPU, the LoRA adapter trains (the margin moves), and the saved
    adapter reloads onto a freshly quantised base with the trained weights."""
    args = GPOConfig(output_dir=str(tmp_path), **cpu_args(max_steps=3))
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset,
                         quantization_config=quantization, peft_config=lora())
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ in ("Linear4bit", "Linear8bitLt")
    trainer.train()
    logs = logged_steps(trainer)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in logs) and logs[-1]["rewards/margins"] != 0
    trainer.save_model(str(tmp_path))

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and t.abs().sum() > 0 for name, t in saved.items())
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization)
    state = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    for name, tensor in saved.items():
        match = [v for k, v in state.items() if k.replace(".default", "") == name]
        assert match and torch.equal(match[0].to(tensor.dtype), tensor), name


@pytest.mark.skipif(not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
                    reason="bitsandbytes converts 4-bit weights to its CPU inference format only on AVX512-BF16 CPUs")
def test_a_4bit_model_already_run_for_inference_is_refused(tiny_models, zen_dataset, tmp_path):
    """A 4-bit model that ran in eval mode without gradients before it reached the trainer has bitsandbytes' bf16
    inference kernel without backward in its layers (see gpo_trl.fourbit): refused with the layer's name, before
    any dataset work."""
    from transformers import AutoModelForCausalLM

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), quantization_config=nf4).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    args = GPOConfig(output_dir=str(tmp_path), **cpu_args(max_steps=1))
    with pytest.raises(ValueError, match=r"4-bit layer model\.layers\.0\.self_attn\.q_proj was already converted.*"
                                         r"Load the model afresh"):
        GPOTrainer(model=model, args=args, train_dataset=zen_dataset, peft_config=lora())


# --- The Hub, intercepted at the client: transformers and gpo_trl run their real code up to HfApi ---------------


class FakeHub:
    """Stands in for the Hub's servers behind HfApi.create_repo / upload_folder, recording what would be sent."""

    def __init__(self, fail_upload: Exception | None = None):
        self.repos, self.uploads, self.fail_upload = [], [], fail_upload

    def create_repo(self, api, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append({"repo_id": repo_id, "private": private})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, repo_id, folder_path, **kwargs):
        if self.fail_upload is not None:
            raise self.fail_upload
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        ignored = kwargs.get("ignore_patterns") or []
        files = {f for f in files if not any(Path(f).match(p) or f.startswith(p.rstrip("*")) for p in ignored
                                             if p != "_*") and not f.startswith("_")}
        self.uploads.append({"repo_id": repo_id, "files": files, "card": (folder / "README.md").read_text()})


@pytest.fixture
def fake_hub(monkeypatch):
    def install(**kwargs):
        hub = FakeHub(**kwargs)
        monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, *a, **k: hub.upload_folder(api, *a, **k))
        return hub

    return install


def demo_args(tmp_path, *extra):
    return parse_args(["--config", DEMO, "--model_name_or_path", str(tmp_path / "assets" / "model"),
                       "--dataset_name", str(tmp_path / "assets" / "data"), "--output_dir", str(tmp_path / "out"),
                       "--max_steps", "3", "--eval_before_training", "false", "--disable_tqdm", "true", *extra])


def test_push_to_hub_uploads_adapter_tokenizer_and_a_gpo_model_card(fake_hub, tmp_path):
    hub = fake_hub()
    recipe_main(*demo_args(tmp_path, "--push_to_hub", "true", "--hub_model_id", "me/gpo-demo",
                           "--hub_private_repo", "true", "--gpo_loss", "exponential", "--beta_calibration", "logistic"))
    assert hub.repos == [{"repo_id": "me/gpo-demo", "private": True}]
    [upload] = hub.uploads
    assert upload["repo_id"] == "me/gpo-demo"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= upload["files"]
    card = upload["card"]
    for expected in (f"Base model: `{tmp_path / 'assets' / 'model'}`", f"`{tmp_path / 'assets' / 'data'}`",
                     "GPO loss: `exponential`, f(t) = `exp(-t)`", "beta = 0.1, effective beta = 0.05",
                     "| learning_rate | 0.005 |", "| LoRA | r=16, alpha=32", "| eval_rewards/accuracies |",
                     'AutoPeftModelForCausalLM.from_pretrained("me/gpo-demo")', "2402.05749"):
        assert expected in card, expected


def test_failed_push_keeps_the_output_and_says_how_to_retry(fake_hub, tmp_path):
    fake_hub(fail_upload=ConnectionError("network unreachable"))
    with pytest.raises(PushError) as info:
        recipe_main(*demo_args(tmp_path, "--push_to_hub", "true", "--hub_model_id", "me/gpo-demo"))
    message = str(info.value)
    assert "ConnectionError: network unreachable" in message and "run is intact" in message
    assert f"gpo-trl push --output_dir {tmp_path / 'out'} --hub_model_id me/gpo-demo" in message
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

    hub = fake_hub()  # the network is back: the printed command finishes the job
    assert cli(["push", "--output_dir", str(tmp_path / "out"), "--hub_model_id", "me/gpo-demo", "--private"]) == 0
    assert hub.repos[-1] == {"repo_id": "me/gpo-demo", "private": True}
    assert "adapter_model.safetensors" in hub.uploads[-1]["files"]


def test_push_command_refuses_a_directory_that_is_not_a_run(fake_hub, tmp_path, capsys):
    fake_hub()
    assert cli(["push", "--output_dir", str(tmp_path), "--hub_model_id", "me/x"]) == 1
    assert "no adapter_config.json or config.json" in capsys.readouterr().err


# --- Runs that last ------------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_continues_the_same_trajectory(tiny_models, demo_datasets, tmp_path):
    """6 steps straight vs a run stopped after step 3 (checkpoint-3) and resumed: steps 4-6 log bit-identical values
    (optimizer, scheduler, RNG and data order all restored)."""
    from transformers import TrainerCallback

    class StopAfterStep3(TrainerCallback):  # a preemption, minus the signal
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def trainer(out, callbacks=None):
        args = GPOConfig(output_dir=str(out), **cpu_args(max_steps=6, save_strategy="steps", save_steps=3,
                                                         per_device_train_batch_size=8, learning_rate=5e-3))
        return GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=demo_datasets["train"],
                          peft_config=lora(), callbacks=callbacks)

    straight = trainer(tmp_path / "straight")
    straight.train()
    interrupted = trainer(tmp_path / "resumed", callbacks=[StopAfterStep3()])
    interrupted.train()
    assert interrupted.state.global_step == 3
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    expected, got = logged_steps(straight)[3:], logged_steps(resumed)[-3:]
    assert [e["step"] for e in got] == [4, 5, 6]
    for e, g in zip(expected, got):  # bit-identical (measured), except the running token count (below)
        assert e.keys() == g.keys()
        for key in e.keys() - {"num_tokens"}:
            assert g[key] == e[key], (g["step"], key, g[key], e[key])
    # num_tokens restarts from 0 on resume, as in TRL 1.16 (its _total_train_tokens is not checkpointed); the tokens
    # counted per step agree
    assert [g["num_tokens"] for g in got[1:]] == [e["num_tokens"] - expected[0]["num_tokens"] + got[0]["num_tokens"]
                                                 for e in expected[1:]]


def test_tensorboard_receives_gpo_diagnostics(tiny_models, zen_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = GPOConfig(output_dir=str(tmp_path), **cpu_args(max_steps=2, report_to=["tensorboard"]))
    trainer = GPOTrainer(model=str(tiny_models["llama"]), args=args, train_dataset=zen_dataset, peft_config=lora())
    trainer.train()
    [events] = list(tmp_path.rglob("events.out.tfevents.*"))  # under output_dir/runs/<date>
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/gpo/margin", "train/gpo/offline_reg", "train/gpo/push", "train/gpo/beta_effective",
            "train/rewards/margins", "train/loss"} <= tags
    logs = logged_steps(trainer)
    assert logs[-1]["gpo/margin"] != 0
    for key in ("gpo/margin", "gpo/offline_reg", "gpo/push", "gpo/beta_effective", "rewards/margins", "loss"):
        written = accumulator.Scalars(f"train/{key}")  # the values the trainer logged, step by step (float32 on disk)
        assert [event.step for event in written] == [entry["step"] for entry in logs], key
        assert [event.value for event in written] == pytest.approx([entry[key] for entry in logs], rel=1e-6), key


def test_evaluate_command_scores_a_trained_adapter(tmp_path, capsys):
    """`gpo-trl evaluate` measures the adapter against its base model: the same held-out numbers the training run
    printed, as a table and as JSON."""
    _, _, after = recipe_main(*demo_args(tmp_path, "--max_steps", "6"))
    capsys.readouterr()
    code = cli(["evaluate", "--config", DEMO, "--adapter_path", str(tmp_path / "out"), "--model_name_or_path",
                str(tmp_path / "assets" / "model"), "--dataset_name", str(tmp_path / "assets" / "data"),
                "--metrics_file", str(tmp_path / "metrics.json")])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_gpo/margin",
                "eval_gpo/offline_reg", "eval_gpo/push"):
        assert metrics[key] == pytest.approx(after[key], rel=1e-4), key
    assert metrics["eval_gpo/margin"] > 0
    printed = capsys.readouterr().out
    table = {line.split()[0]: line.split()[-1] for line in printed.splitlines() if line.startswith("eval_")}
    assert table["eval_gpo/offline_reg"] == f"{metrics['eval_gpo/offline_reg']:.6g}", printed  # the table = the JSON


@pytest.mark.slow
def test_recipe_trains_the_reported_csv_and_jsonl_mixture_with_system_messages(tiny_models, tmp_path, capsys):
    """The issue's mixture (an orca-layout csv with a system column, mapped question -> prompt, and a jsonl with extra
    columns) through `gpo-trl train`'s path: it trains, the data check says what it did, and the prompts TRL
    tokenised are the chat template applied to [system, user] (no system message where the text is empty)."""
    config = tmp_path / "mixture.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_models['llama']}\n"
        "datasets:\n"
        f"  - {{data_files: {DATA / 'orca_style_dpo_pairs_10.csv'}, column_map: {{question: prompt}}}}\n"
        f"  - {{data_files: {DATA / 'qa_preference_extra_columns_8.jsonl'}}}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "max_steps: 2\nper_device_train_batch_size: 4\nmax_length: 256\nlearning_rate: 1.0e-3\nuse_cpu: true\n"
        "bf16: false\nreport_to: none\nsave_strategy: 'no'\neval_strategy: 'no'\nlogging_steps: 1\n"
        "dataloader_num_workers: 0\ndisable_tqdm: true\nuse_peft: true\nlora_target_modules: all-linear\n")
    trainer, _, _ = recipe_main(*parse_args(["--config", str(config)]))
    out = capsys.readouterr().out
    assert "mixture of 2 (train): 18 rows, all valid." in out
    assert "orca_style_dpo_pairs_10.csv [train]: `system` column -> chat messages (a system message in 7 of 10" in out
    logs = logged_steps(trainer)
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)

    with open(DATA / "orca_style_dpo_pairs_10.csv", newline="") as handle:
        orca = list(csv.DictReader(handle))
    # tiny_models' chat template (gpo_trl/demo.py), written out: <|role|>content\n per message, then <|assistant|>
    expected_0 = f"<|system|>{orca[0]['system']}\n<|user|>{orca[0]['question']}\n<|assistant|>"
    expected_1 = f"<|user|>{orca[1]['question']}\n<|assistant|>"  # an empty system cell: no system message
    tokenizer = trainer.processing_class
    prompts = [tokenizer.decode(row["prompt_ids"]) for row in trainer.train_dataset.select(range(2))]
    assert prompts == [expected_0, expected_1]
    assert tokenizer.decode(trainer.train_dataset[0]["chosen_ids"]).startswith(orca[0]["chosen"])


def test_system_column_and_no_chat_template_stops_the_recipe_before_the_model_loads(tiny_models, tmp_path):
    """The "model" directory holds only a tokenizer without a chat template: had the recipe got as far as loading
    the model, it would fail on the missing weights instead of naming the data source."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tokenizer_only")
    config = tmp_path / "mixture.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'tokenizer_only'}\n"
        f"datasets:\n  - {{data_files: {DATA / 'orca_style_dpo_pairs_10.csv'}, column_map: {{question: prompt}}}}\n"
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nbf16: false\nreport_to: none\nmax_length: 256\n")
    with pytest.raises(DataError, match=r"orca_style_dpo_pairs_10.csv \[train\].*has no chat template"):
        recipe_main(*parse_args(["--config", str(config)]))


@pytest.mark.parametrize("name", ["cpu_ddp", "multi_gpu", "fsdp2", "zero2", "zero3"])
def test_shipped_accelerate_configs_load(name):
    """Each config loads with accelerate's own loader and has the distributed type its name promises."""
    from accelerate.commands.config.config_args import load_config_from_file

    from gpo_trl.cli import resolve_accelerate_config

    path = resolve_accelerate_config(name)
    assert path == (REPO / "configs" / "accelerate" / f"{name}.yaml").resolve()
    config = load_config_from_file(str(path))
    expected = {"cpu_ddp": "MULTI_GPU", "multi_gpu": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED",
                "zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "cpu_ddp":
        assert config.num_processes == 2 and config.mixed_precision == "no"
