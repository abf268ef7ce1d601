"""Config: recipes load and validate; overrides convert types and reject unknown keys and bad values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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
    # Seeds past a 64-bit integer overflowed torch's generator at the first batch.
    (["--seed=99999999999999999999"], r"^seed must be in \[0, 2\*\*63 - 1\], got 99999999999999999999$"),
    (["--seed=-1"], r"^seed must be in \[0, 2\*\*63 - 1\], got -1$"),
    # Infinite values were accepted (and trained into NaN); NaN was refused by each range check.
    (["--lr=inf"], "^lr must be finite, got inf$"),
    (["--lr=nan"], "^lr must be finite, got nan$"),
    (["--optimizer=muon", "--muon_lr=inf"], "^muon_lr must be finite, got inf$"),
    (["--data_memory_gb=inf"], "^data_memory_gb must be finite, got inf$"),
    (["--contrast=0.5,inf"], "^contrast must be finite, got 0.5,inf$"),
    # Finite, but past what the optimiser's float32 scalars hold: an overflow at the first step.
    (["--lr=1e308"], r"^lr is 1e\+308, more than a float32 holds"),
    (["--lr=1e38", "--norm_lr_mult=64"], r"^lr x norm_lr_mult is 6\.4e\+39, more than a float32 holds"),
    (["--optimizer=muon", "--muon_lr=1e39"], r"^muon_lr is 1e\+39, more than a float32 holds"),
    (["--weight_decay=1e300"], r"^weight_decay is 1e\+300, more than a float32 holds"),
    # Each message names only the offending key and its value.
    (["--threads=-1"], "^threads must be >= 0, got -1$"),
    (["--log_probs=-2"], "^log_probs must be >= 0, got -2$"),
    (["--cutout=-1"], "^cutout must be >= 0, got -1$"),
    (["--translate=-3"], "^translate must be >= 0, got -3$"),
    (["--ckpt_every=0"], "^ckpt_every must be > 0, got 0$"),
    (["--eval_batch_size=0"], "^eval_batch_size must be > 0, got 0$"),
    (["--min_delta=-0.5"], r"^min_delta must be >= 0, got -0\.5$"),
    (["--cutmix=-1"], r"^cutmix must be >= 0, got -1\.0$"),
    (["--freeze_epochs=-1"], r"^freeze_epochs must be >= 0, got -1\.0$"),
])
def test_bad_overrides_are_one_clear_error(args, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_config("lenet5-mnist", parse_overrides(args))


def test_largest_values_that_fit_are_accepted():
    c = resolve_config("lenet5-mnist", parse_overrides(["--seed=9223372036854775807", "--lr=3e38"]))
    assert c.seed == 2**63 - 1 and c.lr == 3e38


def test_a_seed_near_the_limit_seeds_every_stream():
    """The step's generators reduce the seed to 64 bits; seeds that fitted before draw exactly as before."""
    from cnnlab.train.steps import AUGMENT, BATCH_ORDER, seeded_generator

    for stream in (AUGMENT, BATCH_ORDER):
        seeded_generator(2**63 - 1, 10**6, stream)  # overflowed torch's 64-bit seed before
    mult, offset = AUGMENT
    before = torch.Generator().manual_seed((7 * 1_000_003 + 3) * mult + offset)
    assert torch.equal(torch.rand(5, generator=seeded_generator(7, 3, AUGMENT)), torch.rand(5, generator=before))


def test_epochs_too_many_to_count_is_a_config_error():
    c = make_config({"epochs": 1e308})
    with pytest.raises(ConfigError, match="epochs=1e\\+308 of 60000 images is too many steps"):
        c.total_steps(60000)
    assert make_config({"epochs": 2.0, "batch_size": 100}).total_steps(60000) == 1200


def test_an_integer_too_large_for_a_float_is_a_config_error(tmp_path):
    recipe = tmp_path / "big.toml"
    recipe.write_text("lr = 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError, match="bad value for lr: an integer too large for a float"):
        load_recipe(str(recipe))


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
    not_utf8 = tmp_path / "bom16.toml"
    not_utf8.write_bytes(b"\xff\xfe")  # a UTF-16 byte-order mark: not the UTF-8 TOML requires
    with pytest.raises(ConfigError, match=r"^recipe .*bom16\.toml: not UTF-8 text \(byte 0xff at offset 0\)"):
        load_recipe(str(not_utf8))


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
