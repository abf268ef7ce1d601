"""Declarative models: spec parsing, equivalence with the tutorial models, TOML layer lists, describe, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.cli import main
from cnnlab.errors import ModelError
from cnnlab.infer import load_trained
from cnnlab.models import count_params, create_model
from cnnlab.models.spec import describe_model

ESTIMATOR_SPEC = "spec:conv32k5-pool2-conv64k5-pool2-fc1024-drop0.4-fc10"
LENET_SPEC = "spec:conv6k5tanh-pool2-conv16k5pvalid-pool2-fc120tanh-fc84tanh-fc10"


def layer_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(layer type, output shape of one sample) for every layer of features then head."""
    x, out = torch.zeros(1, *model.meta.input_size), []
    model.eval()
    for layer in [*model.features, *model.head]:
        x = layer(x)
        out.append((type(layer).__name__, tuple(x.shape[1:])))
    return out


@pytest.mark.parametrize("spec,registered", [(ESTIMATOR_SPEC, "tf-estimator-cnn"), (LENET_SPEC, "lenet5")])
def test_spec_rebuilds_tutorial_models(spec, registered):
    ref, m = create_model(registered), create_model(spec)
    assert count_params(m) == count_params(ref)  # 3,274,634 and 61,706
    assert layer_shapes(m) == layer_shapes(ref)
    # Same layers at the same places: the tutorial model's weights load as they are and give the same logits.
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(4, *ref.meta.input_size)
    torch.testing.assert_close(m.eval()(x), ref.eval()(x))
    assert m.meta.name == spec and m.meta.input_size == (1, 28, 28) and m.meta.num_classes == 10


def test_estimator_spec_parameter_count():
    assert count_params(create_model(ESTIMATOR_SPEC)) == 3_274_634


def test_tokens_bn_activation_stride_pooling_and_kwargs():
    m = create_model("spec:in3x32x32-conv16k3-bn-conv16k3s2-BN-tanh-avgpool2-conv8k3pvalid-gelu-gap-fc20-drop0.1-fc7",
                     num_classes=4)
    f = list(m.features)
    kinds = [type(x).__name__ for x in f]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "Tanh", "AvgPool2d", "Conv2d", "GELU",
                     "AdaptiveAvgPool2d"]
    assert f[0].bias is None and f[3].bias is None and f[7].bias is not None  # bn's shift replaces the bias
    assert f[3].stride == (2, 2) and f[7].padding == (0, 0)
    shapes = [s for _, s in layer_shapes(m)]
    assert shapes[3] == (16, 16, 16) and shapes[6] == (16, 8, 8) and shapes[7] == (8, 6, 6)
    assert [type(x).__name__ for x in m.head] == ["Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert m.head[-1].out_features == 4 and m.meta.num_classes == 4 and m.meta.input_size == (3, 32, 32)
    # in_chans / img_size override the spec's input token, as the training loop passes them.
    m2 = create_model("spec:in3x32x32-conv8k3-pool2-fc5", in_chans=1, img_size=20)
    assert m2.meta.input_size == (1, 20, 20) and m2.features[0].in_channels == 1
    assert m2.head[1].in_features == 8 * 10 * 10
    # Every parameter learns: forward/backward through a spec model.
    x = torch.rand(3, 3, 32, 32)
    nn.functional.cross_entropy(m.train()(x), torch.tensor([0, 1, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_toml_layer_list_equals_string(tmp_path):
    f = tmp_path / "net.toml"
    f.write_text("""
input = [1, 28, 28]
layers = [
  {type = "conv", filters = 32, kernel = 5},
  "pool2",
  {type = "conv", filters = 64, kernel = 5, padding = "same", activation = "relu"},
  {type = "pool", size = 2},
  {type = "dense", units = 1024},
  {type = "dropout", rate = 0.4},
  {type = "fc", units = 10},
]
""")
    m = create_model(f"spec:{f}")
    # The name records the layers, not the file: a checkpoint never depends on the TOML file.
    assert m.meta.name == "spec:in1x28x28-conv32k5-pool2-conv64k5psamerelu-pool2-fc1024-drop0.4-fc10"
    assert count_params(m) == 3_274_634
    assert layer_shapes(m) == layer_shapes(create_model(ESTIMATOR_SPEC))


@pytest.mark.robust
@pytest.mark.parametrize("spec,needle", [
    ("spec:conv32k5-pol2-fc10", "'pol2': unknown token"),
    ("spec:conv32k5-fc10relu", "takes no activation"),
    ("spec:conv32k5-pool2", "must end with the classifier"),
    ("spec:conv32k5--fc10", "empty token"),
    ("spec:conv8k3-fc10-conv3k3-fc2", "cannot follow a dense layer"),
    ("spec:conv32k5-bn16-fc10", "has 32 channels, not 16"),
    ("spec:conv8k27pvalid-conv8k3pvalid-fc10", "at 'conv8k3pvalid': does not fit its 8x2x2 input"),
    ("spec:conv8k4s2-fc10", "even kernel"),
    ("spec:fc10", "no layer before the first fc"),
    ("spec:conv8k3-drop1.5-fc10", "dropout probability"),
    ("spec:", "empty token"),
])
def test_bad_spec_is_one_clear_model_error(spec, needle, capsys):
    with pytest.raises(ModelError, match=None) as e:
        create_model(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert main(["models", "--describe", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: ") and needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.robust
def test_bad_toml_spec(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('layers = [{type = "conv", filters = 8}]')
    with pytest.raises(ModelError, match="needs 'kernel'"):
        create_model(f"spec:{f}")
    f.write_text("layers = [")
    with pytest.raises(ModelError, match="invalid TOML"):
        create_model(f"spec:{f}")
    assert main(["models", "--describe", f"spec:{tmp_path / 'missing.toml'}"]) == 2
    assert "cannot read model spec" in capsys.readouterr().err


def test_describe_table(capsys):
    assert main(["models", "--describe", ESTIMATOR_SPEC]) == 0
    out = capsys.readouterr().out
    assert "Total params: 3,274,634" in out and "Trainable params: 3,274,634" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("features.", "head."))]
    assert [r[0] for r in rows] == [f"features.{i}" for i in range(6)] + [f"head.{i}" for i in range(5)]
    # Output shapes per layer and parameter counts, as Keras' summary shows them.
    by_name = {r[0]: r for r in rows}
    assert by_name["features.0"][-2:] == ["32x28x28", "832"]
    assert by_name["features.5"][-2:] == ["64x7x7", "0"]
    assert by_name["head.1"][-2:] == ["1024", "3,212,288"]
    assert by_name["head.4"][-2:] == ["10", "10,250"]
    # Registered models too; BN running statistics count as non-trainable (Keras' rule).
    text = describe_model(create_model("cifar10-prettytensor"))
    assert "Trainable params: 731,658" in text and "Non-trainable params: 128" in text and "64x6x6" in text


def test_spec_model_trains_saves_and_restores(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    spec = "spec:conv8k3-bn-pool2-conv16k3-pool2-fc32-fc10"

    def train(steps: int) -> int:
        return main(["train", "--model-dir", str(run), f"--model={spec}", "--dataset=mnist", f"--steps={steps}",
                     "--batch_size=16", "--log_every=2", "--ckpt_every=2", "--eval_batch_size=16", "--no-report"])

    assert train(4) == 0
    trained = load_trained(run)
    assert trained.model.meta.name == spec and trained.model.meta.args == {"num_classes": 10, "in_chans": 1}
    assert count_params(trained.model) == count_params(create_model(spec))
    # Resume rebuilds the same spec model from the checkpoint and carries on.
    assert train(6) == 0
    assert "resuming from ckpt-00000004.safetensors (step 4)" in capsys.readouterr().out
    assert main(["evaluate", str(run)]) == 0
    assert "step 6" in capsys.readouterr().out
