"""Config: recipes load and validate; overrides convert types and reject unknown keys and bad values."""

from __future__ import annotations

import dataclasses

import pytest

from cnnlab.config import TrainConfig, list_recipes, load_recipe, make_config, parse_overrides, resolve_config
from cnnlab.errors import ConfigError
from cnnlab.models import list_models, model_entry

TUTORIAL_RECIPES = ["tf-estimator-cnn-mnist", "tf-core-convnet-mnist", "tf2-convnet-mnist",
                    "cifar10-prettytensor", "lenet5-mnist"]


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_and_names_a_model(name):
    config = resolve_config(name)
    assert config.model in list_models() or model_entry(config.model).name == config.model  # timm:NAME too


def test_tutorial_recipes_match_the_tutorials():
    est = resolve_config("tf-estimator-cnn-mnist")
    assert (est.optimizer, est.lr, est.batch_size, est.steps, est.log_every) == ("sgd", 0.001, 100, 20000, 50)
    cifar = resolve_config("cifar10-prettytensor")
    assert (cifar.optimizer, cifar.lr, cifar.batch_size, cifar.steps) == ("adam", 1e-4, 64, 150000)
    assert cifar.random_crop and cifar.flip and cifar.hue == 0.05 and cifar.contrast == (0.3, 1.0)
    assert cifar.brightness == 0.2 and cifar.saturation == (0.0, 2.0)
    core = resolve_config("tf-core-convnet-mnist")
    assert core.total_steps(60000) == 2344  # 5 epochs of 128, last batch partial
    for name in TUTORIAL_RECIPES:
        assert load_recipe(name).reference["accuracy"] > 0.79


def test_overrides_convert_types():
    o = parse_overrides(["--lr=0.01", "--batch-size", "64", "--flip", "--no-channels-last",
                         "--contrast=0.2,0.9", "--model_args.dropout=0.3"])
    c = resolve_config("lenet5-mnist", o)
    assert c.lr == 0.01 and c.batch_size == 64 and c.flip is True and c.channels_last is False
    assert c.contrast == (0.2, 0.9) and c.model_args == {"dropout": 0.3}


@pytest.mark.parametrize("args,msg", [
    (["--lr=-1"], "lr must be > 0"),
    (["--batch_size=0"], "batch_size must be > 0"),
    (["--lr=abc"], "bad value for lr"),
    (["--bach_size=3"], "did you mean batch_size"),
    (["--optimizer=rmsprop"], "optimizer must be one of"),
    (["--steps=1.5"], "bad value for steps"),
    (["--flip=maybe"], "bad value for flip"),
])
def test_bad_overrides_are_one_clear_error(args, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_config("lenet5-mnist", parse_overrides(args))


def test_unknown_recipe_and_bad_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'lenet'"):
        load_recipe("lenet")
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "lenet5"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        load_recipe(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("model = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_recipe(str(broken))


def test_config_is_frozen_and_round_trips():
    c = make_config({"model": "lenet5", "contrast": [0.3, 1.0]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0  # type: ignore[misc]
    assert make_config(c.to_dict()) == c
    assert TrainConfig().total_steps(1000) == TrainConfig().steps


def test_every_field_has_a_one_line_description():
    for f in dataclasses.fields(TrainConfig):
        text = f.metadata.get("help", "")
        assert text.strip() and "\n" not in text, f.name


def test_mutable_defaults_are_not_shared():
    a, b = TrainConfig(), TrainConfig()
    a.model_args["dropout"] = 0.5
    assert b.model_args == {} and TrainConfig().model_args == {}


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    from cnnlab import runtime

    amd, intel = "AuthenticAMD", "GenuineIntel"
    cases = (("fpu sse avx2 avx512f", amd, "fp32"), ("fpu sse avx2 avx512f", intel, "fp32"),
             ("avx512f avx512_bf16", amd, "bf16"),
             ("avx512f avx512_bf16", intel, "fp32"),  # Intel without AMX: bf16 kernels slower than fp32
             ("avx512f avx512_bf16 amx_bf16 amx_tile", intel, "bf16"), ("avx512_bf16", "", "fp32"))
    for flags, vendor, want in cases:
        info = {"flags": flags, "vendor_id": vendor}
        monkeypatch.setattr(runtime, "cpuinfo", lambda key, info=info: info.get(key, ""))
        assert runtime.resolve_precision("auto") == want, (flags, vendor)
        assert runtime.resolve_precision("fp32") == "fp32" and runtime.resolve_precision("bf16") == "bf16"


def test_auto_precision_run_records_what_it_used(tiny_data, tmp_path, monkeypatch):
    import json

    from cnnlab import runtime
    from cnnlab.cli import main

    monkeypatch.setattr(runtime, "cpuinfo", lambda key: "avx2" if key == "flags" else "")
    run = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--model-dir", str(run), "--steps=2", "--batch_size=8",
                 "--eval_batch_size=16", "--precision=auto", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["precision"] == "fp32"
    # a rerun of the same command resumes (same resolved config), it is not refused as another run
    assert main(["train", "--model", "lenet5", "--model-dir", str(run), "--steps=2", "--batch_size=8",
                 "--eval_batch_size=16", "--precision=auto", "--no-progress"]) == 0
