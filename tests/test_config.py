"""GPOConfig validation and the strict YAML / command-line parser. All of it runs before any model is loaded."""

from pathlib import Path

import pytest
import yaml

from gpo_trl import CalibrationError, GPOConfig
from gpo_trl.recipe import ConfigError, parse_args

REPO = Path(__file__).parent.parent


def config(**kwargs) -> GPOConfig:
    return GPOConfig(output_dir="unused", use_cpu=True, report_to=[], **kwargs)


def test_defaults_reproduce_dpo():
    args = config()
    assert args.gpo_loss == "logistic" and args.effective_beta == args.beta == 0.1
    assert args.build_loss().name == "logistic"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gpo_loss="logistc"), "Unknown GPO loss 'logistc'. Available: logistic, hinge"),
        (dict(beta=0.0), r"`beta` must be a number > 0, got 0.0"),
        (dict(beta=-1.0), r"`beta` must be a number > 0"),
        (dict(loss_type="ipo", gpo_loss="squared"), r"`gpo_loss='squared'` shapes the gpo_loss term"),
        (dict(loss_type="dpo"), "`loss_type` entry 'dpo' is not a TRL 1.16 loss type"),
        (dict(ld_alpha=-0.5), r"`ld_alpha` must be in \[0, 1\]"),
        (dict(gpo_loss_kwargs="{bad json"), "`gpo_loss_kwargs` must be a JSON mapping"),
        (dict(gpo_loss="hinge", beta_calibration="logistic"), "undefined with 'hinge'"),
        (dict(gpo_loss="logistic", beta_calibration="hinge"), "undefined with 'hinge'"),
        (dict(beta_calibration="nope"), "`beta_calibration='nope'` is not a registered loss"),
    ],
)
def test_invalid_values_fail_in_post_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(gpo_loss="hinge", beta_calibration="logistic"),
                                    dict(gpo_loss="logistic", beta_calibration="hinge")])
def test_calibration_refusal_has_its_own_exception(kwargs):
    """hinge has c_f = 0: the refusal is a CalibrationError (still a ValueError), so callers catch it by type."""
    with pytest.raises(CalibrationError, match="undefined with 'hinge'") as caught:
        config(**kwargs)
    assert isinstance(caught.value, ValueError)


def test_other_calibration_mistakes_are_not_calibration_errors():
    with pytest.raises(ValueError, match="not a registered loss") as caught:
        config(beta_calibration="nope")
    assert not isinstance(caught.value, CalibrationError)


@pytest.mark.parametrize(
    "loss, reference, factor",
    [("exponential", "logistic", 0.5), ("squared", "logistic", 0.5), ("savage", "logistic", 1.0),
     ("logistic", "squared", 2.0), ("truncated_quadratic", "exponential", 1.0)],
)
def test_beta_calibration_matches_offline_regularisation(loss, reference, factor):
    """beta_f = beta * c_g / c_f, so that beta_f * c_f (f's regulariser strength) equals beta * c_g."""
    args = config(gpo_loss=loss, beta_calibration=reference, beta=0.2)
    assert args.effective_beta == pytest.approx(0.2 * factor)
    reference_strength = 0.2 * config(gpo_loss=reference).build_loss().c_f
    assert args.effective_beta * args.build_loss().c_f == pytest.approx(reference_strength)


def test_loss_kwargs_from_json_string_reach_an_import_path_loss():
    args = config(gpo_loss="custom_losses:smoothed_hinge", gpo_loss_kwargs='{"margin": 2.0}')
    assert args.gpo_loss_kwargs == {"margin": 2.0}
    assert args.build_loss().kwargs == {"margin": 2.0}
    assert args.build_loss().formula == "softplus(sharpness * (margin - t)) / sharpness"


def test_loss_kwargs_the_function_does_not_take_are_rejected():
    with pytest.raises(ValueError, match="'logistic' raised TypeError.*unexpected keyword argument 'foo'"):
        config(gpo_loss_kwargs={"foo": 1})


# --- The strict parser -------------------------------------------------------------------------------------------


def write_recipe(tmp_path, **entries) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "use_cpu": True, **entries}))
    return str(path)


def test_yaml_values_and_command_line_overrides(tmp_path):
    recipe = write_recipe(tmp_path, beta=0.3, gpo_loss="hinge", model_name_or_path="m", dataset_name="d")
    script, training, model, _ = parse_args(["--config", recipe, "--beta", "0.5", "--gpo_loss", "squared"])
    assert training.beta == 0.5 and training.gpo_loss == "squared"  # the command line wins
    assert model.model_name_or_path == "m" and script.dataset_name == "d"
    _, training, _, _ = parse_args(["--config", recipe])
    assert training.beta == 0.3 and training.gpo_loss == "hinge"


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path):
    recipe = write_recipe(tmp_path, bta=0.3)
    with pytest.raises(ConfigError, match=r"Unknown key 'bta' in the YAML recipe. Did you mean 'beta'"):
        parse_args(["--config", recipe])


def test_unknown_command_line_key_is_an_error_with_a_suggestion(tmp_path):
    recipe = write_recipe(tmp_path)
    with pytest.raises(ConfigError, match=r"Unknown key 'gpo_los' in the command line. Did you mean 'gpo_loss'"):
        parse_args(["--config", recipe, "--gpo_los", "hinge"])
    with pytest.raises(ConfigError, match=r"Unknown key 'learning_rat'.*'learning_rate'"):
        parse_args(["--config", recipe, "--learning_rat=0.1"])


def test_several_unknown_keys_are_all_reported(tmp_path):
    recipe = write_recipe(tmp_path, bta=0.3, lora_rr=8)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", recipe, "--zzz_nothing_like_it", "1"])
    text = str(info.value)
    assert "'bta'" in text and "'lora_rr'" in text and "'lora_r'" in text and "zzz_nothing_like_it" in text


def test_missing_or_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        parse_args(["--config", str(bad)])


def test_invalid_gpo_value_in_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Unknown GPO loss 'expo'"):
        parse_args(["--config", write_recipe(tmp_path, gpo_loss="expo")])


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("configs/*.yaml"), *REPO.glob("configs/recipes/*.yaml")]))
def test_every_recipe_in_the_tree_parses(recipe):
    """Every YAML recipe shipped in configs/ loads with the strict parser (no unknown keys, valid values).
    GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine unless use_cpu is set."""
    script, training, model, data = parse_args(["--config", str(REPO / recipe), "--use_cpu", "true"])
    assert model.model_name_or_path and (script.dataset_name or data.datasets)
    assert training.build_loss() is not None


def test_checkpointing_keeps_trls_default_under_the_new_name():
    """TRL's base config defaults the deprecated `gradient_checkpointing` to True, which made transformers 5 warn on
    every config. GPOConfig keeps that default as `activation_checkpointing` without a warning; the old name still
    works (and warns, as transformers intends, for a recipe that uses it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert config().activation_checkpointing is True and config().gradient_checkpointing is True
        off = config(activation_checkpointing=False)
        assert off.activation_checkpointing is False and off.gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):
        old = config(gradient_checkpointing=False)
    assert old.activation_checkpointing is False


DEMO = str(Path(__file__).parent.parent / "configs" / "demo.yaml")


@pytest.mark.parametrize("flags, expected", [
    (["--datasets", "a", "b"], [("a", None, "train"), ("b", None, "train")]),
    (["--datasets", '[{"path": "a", "weight": 2}, {"path": "b", "split": "dev"}]'], [("a", 2, "train"), ("b", None, "dev")]),
    (["--datasets", '{path: a, weight: 3}'], [("a", 3, "train")]),  # YAML's flow style too
    (["--datasets", "x", '[{"path": "a"}]'], [("x", None, "train"), ("a", None, "train")]),
])
def test_datasets_from_the_command_line(flags, expected):
    """`--datasets` takes paths and JSON/YAML mappings or lists of them, each entry becoming the sources it names
    (the argument parser alone made `[{"path": ...}]` one source whose path was that text)."""
    _, _, _, data_args = parse_args(["--config", DEMO, *flags])
    assert [(s.path, s.weight, s.split) for s in data_args.datasets] == expected


@pytest.mark.parametrize("text, message", [
    ('[{"path": "a"', "is neither a path nor a JSON/YAML mapping or list of mappings"),
    ('{"path": "a", "wieght": 2}', "Unknown key 'wieght' in a `datasets` entry"),
    ("[1, 2]", "A `datasets` entry must be a mapping of source keys"),
])
def test_malformed_datasets_flag_is_named(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", DEMO, "--datasets", text])
