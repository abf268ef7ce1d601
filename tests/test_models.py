"""Every registered model: forward/backward, shapes, gradients; tutorial layer shapes; conv parity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab.errors import ModelError
from cnnlab.models import count_params, create_model, list_models
from cnnlab.models.layers import Dropout, pool_before_relu

# Parameter counts implied by the tutorials' layer definitions (e.g. the TF estimator guide's
# 3,274,634 for conv32-conv64-dense1024), so a wrong kernel size, padding or width fails here.
TUTORIAL_PARAMS = {
    "tf-estimator-cnn": 3_274_634,
    "tf-core-convnet": 218_490,
    "tf2-convnet": 1_669_002,
    "cifar10-prettytensor": 731_658,
    "lenet5": 61_706,
}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(3, *model.meta.input_size)
    logits = model(x)
    assert logits.shape == (3, model.meta.num_classes)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # frozen by design (airbench's data-set whitening)
            assert p.grad is None, pname
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got no gradient"
    # The common parts that plots and export rely on.
    assert isinstance(model.features, torch.nn.Module) and isinstance(model.head, torch.nn.Module)
    assert model.head(model.features(x)).shape == logits.shape


@pytest.mark.parametrize("name,params", sorted(TUTORIAL_PARAMS.items()))
def test_tutorial_parameter_counts(name, params):
    assert count_params(create_model(name)) == params


def test_tutorial_layer_shapes():
    # The estimator guide's comments: [N,28,28,32] -> pool [N,14,14,32] -> [N,14,14,64] -> pool [N,7,7,64].
    m = create_model("tf-estimator-cnn").eval()
    shapes = []
    x = torch.zeros(1, 1, 28, 28)
    for layer in m.features:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 28, 28), (32, 28, 28), (32, 14, 14), (64, 14, 14), (64, 14, 14), (64, 7, 7)]
    # CIFAR tutorial: 24x24 crops, 2 pools -> 6x6x64 = 2304 into fc 256.
    assert create_model("cifar10-prettytensor").head[1].in_features == 2304
    # LeNet-5 tutorial: 28x28x6 (SAME) -> 14x14x6 -> 10x10x16 (VALID) -> 5x5x16 = 400.
    assert create_model("lenet5").head[1].in_features == 400


def test_same_conv_matches_hand_computed_correlation():
    m = create_model("tf-estimator-cnn")
    conv = m.features[0]
    rng = np.random.default_rng(0)
    img = rng.random((28, 28)).astype(np.float32)
    w = conv.weight.detach().numpy()[5, 0]  # one 5x5 kernel
    b = conv.bias.detach().numpy()[5]
    padded = np.pad(img, 2)  # TF 'SAME' for 5x5 stride 1: 2 on each side
    # Cross-correlation (what TF and PyTorch call convolution), output (10, 17).
    want = (padded[10:15, 17:22] * w).sum() + b
    got = conv(torch.from_numpy(img)[None, None])[0, 5, 10, 17].item()
    assert got == pytest.approx(float(want), abs=1e-5)


def test_tf_style_init():
    m = create_model("tf-estimator-cnn")
    fc = m.head[1]
    limit = (6 / (fc.in_features + fc.out_features)) ** 0.5  # Glorot-uniform bound
    assert fc.weight.abs().max() <= limit and fc.weight.abs().max() > 0.9 * limit
    assert (fc.bias == 0).all()


def test_create_model_options():
    m = create_model("tf-estimator-cnn", num_classes=7, dropout=0.1, in_chans=3, img_size=32)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert m.meta.args == {"num_classes": 7, "dropout": 0.1, "in_chans": 3, "img_size": 32}
    # None means "keep the model's default".
    assert create_model("tf-estimator-cnn", dropout=None).head[3].p == 0.4


def test_airbench_whitening_decorrelates_patches():
    torch.manual_seed(0)
    model = create_model("airbench")
    images = torch.rand(300, 3, 32, 32) * torch.tensor([1.0, 0.5, 0.2])[:, None, None]
    images[:, 1] += 0.4 * images[:, 0]  # correlated channels
    whiten = model.features[0]
    whiten.init_from_data(images)
    out = torch.nn.functional.conv2d(images - images.mean((0, 2, 3), keepdim=True), whiten.weight)
    half = out[:, : whiten.out_channels // 2].transpose(0, 1).reshape(whiten.out_channels // 2, -1)
    cov = torch.cov(half)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3  # decorrelated
    # unit variance, a little less along the weakest directions (eps regularises 1/sqrt(eigenvalue))
    assert (torch.diag(cov) > 0.8).all() and (torch.diag(cov) < 1.01).all()
    assert not whiten.weight.requires_grad



def test_airbench_dirac_starts_each_3x3_convolution_as_the_identity_and_bn_scale_can_stay_1():
    torch.manual_seed(0)
    model = create_model("airbench", w1=8, w2=16, w3=16, dirac=True, bn_scale=False)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 6
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 5, 5)
        y, k = conv(x), min(conv.in_channels, conv.out_channels)
        assert torch.allclose(y[:, :k], x[:, :k], atol=1e-5)  # the first outputs pass the input through
        assert conv.weight[k:].abs().sum() > 0 or k == conv.out_channels  # the others start random
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    plain = create_model("airbench", w1=8, w2=16, w3=16)
    assert list(plain.state_dict()) == list(model.state_dict())  # the same checkpoints load into either
    assert all(m.weight.requires_grad for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(1, 24, 5, 5)
    assert not torch.allclose(plain.features[2](x), x[:, :8], atol=1e-2)  # without dirac: random filters

def test_registry_errors_and_patterns():
    assert set(list_models("tf*")) == {"tf-estimator-cnn", "tf-core-convnet", "tf2-convnet"}
    assert list_models("tf-*") == ["tf-core-convnet", "tf-estimator-cnn"]
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ModelError, match="takes no argument"):
        create_model("lenet5", dropout=0.5)


@pytest.mark.parametrize("name", ["tf-estimator-cnn", "tf-core-convnet", "tf2-convnet", "cifar10-prettytensor"])
def test_pool_before_relu_is_exact(name):
    """The training loop's reorder gives bit-identical outputs and gradients and keeps the state-dict keys."""
    torch.manual_seed(0)
    a = create_model(name).eval()  # eval: no dropout draws, BN uses running stats
    b = copy.deepcopy(a)
    assert pool_before_relu(b) >= 1
    assert list(a.state_dict()) == list(b.state_dict())
    kinds = [type(m).__name__ for m in b.features]
    assert kinds[kinds.index("MaxPool2d") + 1] == "ReLU"
    x = torch.randn(8, *a.meta.input_size)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad), n


def test_pool_before_relu_leaves_other_orders_alone():
    seq = nn.Sequential(nn.Tanh(), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(2, padding=1), nn.ReLU(inplace=True),
                        nn.MaxPool2d(2), nn.ReLU(), nn.AvgPool2d(2))
    before = [type(m) for m in seq]
    assert pool_before_relu(seq) == 0
    assert [type(m) for m in seq] == before


def test_fast_dropout_statistics():
    torch.manual_seed(0)
    d = Dropout(0.4)
    x = torch.ones(200, 1000)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.6) < 0.01  # P(keep) = 1 - p
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.6))  # survivors scaled by 1 / (1 - p)
    assert abs(y.mean().item() - 1.0) < 0.02  # expectation preserved
    yb = d(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    d.eval()
    assert d(x) is x
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x)) and torch.equal(Dropout(0.0)(x), x)
    assert isinstance(d, nn.Dropout)


def test_mnist_fast_convs_deepens_each_stage_and_keeps_the_default_net():
    """``convs`` adds conv-BN-GELU layers after each pool; unset it builds the same net (so old runs still load)."""
    default = create_model("mnist-fast")
    # The default net, layer by layer: the state-dict keys and shapes every saved mnist-fast run holds.
    shapes = {k: tuple(v.shape) for k, v in default.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == {
        "features.0.weight": (24, 1, 3, 3), "features.2.weight": (24,), "features.2.bias": (24,),
        "features.2.running_mean": (24,), "features.2.running_var": (24,),
        "features.4.weight": (48, 24, 3, 3), "features.6.weight": (48,), "features.6.bias": (48,),
        "features.6.running_mean": (48,), "features.6.running_var": (48,),
        "features.8.weight": (96, 48, 3, 3), "features.10.weight": (96,), "features.10.bias": (96,),
        "features.10.running_mean": (96,), "features.10.running_var": (96,),
        "head.2.weight": (10, 96), "head.2.bias": (10,)}
    assert count_params(default) == 53_362
    assert list(create_model("mnist-fast", convs=1).state_dict()) == list(default.state_dict())

    deep = create_model("mnist-fast", c1=8, c2=16, c3=32, convs=3)
    convs = [m for m in deep.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 8), (8, 8), (8, 8), (8, 16), (16, 16), (16, 16), (16, 32), (32, 32), (32, 32)]
    assert deep.meta.args["convs"] == 3
    x = torch.rand(4, 1, 28, 28)
    assert deep.features(x).shape == (4, 32, 3, 3)  # the extra convolutions keep the pooled size
    assert deep(x).shape == (4, 10)
    with pytest.raises(ModelError, match="convs must be >= 1, got 0"):
        create_model("mnist-fast", convs=0)


def test_mnist_fast_per_stage_convs_stem_and_act():
    """A list of convs sets each stage's depth; the patch stem and ReLU replace their layers, not the shapes."""
    net = create_model("mnist-fast", c1=8, c2=16, c3=32, convs=[1, 2, 3])
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 16), (16, 16), (16, 32), (32, 32),
                                                                (32, 32)]
    assert net.meta.args["convs"] == [1, 2, 3]

    patch = create_model("mnist-fast", c1=8, c2=16, c3=32, stem="patch", act="relu")
    layers = list(patch.features)
    # The 2x2 patches become 4 channels at 14 x 14: no full-size convolution and no pool in the first stage.
    assert isinstance(layers[0], nn.PixelUnshuffle) and layers[1].in_channels == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in layers) == 2
    assert not any(isinstance(m, nn.GELU) for m in layers) and sum(isinstance(m, nn.ReLU) for m in layers) == 3
    x = torch.rand(4, 1, 28, 28)
    assert patch.features[:4](x).shape == (4, 8, 14, 14)
    assert patch.features(x).shape == (4, 32, 3, 3) and patch(x).shape == (4, 10)

    # Spelled-out defaults build the default net, weight for weight from the same seed.
    torch.manual_seed(0)
    plain = create_model("mnist-fast")
    torch.manual_seed(0)
    spelled = create_model("mnist-fast", convs=[1, 1, 1], stem="pool", act="gelu")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), spelled.state_dict().values()))
    assert list(plain.state_dict()) == list(spelled.state_dict())


def test_mnist_fast_deep_net_draws_its_weights_as_before():
    """Seeded runs of ``convs = 2`` (the fashion recipe) keep their weights: each stage's extra conv-BN is
    built before the stage's first convolution, as the net was built before the per-stage options existed."""
    def reference(c: tuple[int, int, int]) -> list[nn.Module]:
        layers, i = [], 1
        for o in c:
            extra = [nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.GELU()]
            layers += [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(o), nn.GELU(),
                       *extra]
            i = o
        return layers

    torch.manual_seed(0)
    ref = nn.Sequential(*reference((16, 32, 64)))
    for convs in (2, [2, 2, 2]):
        torch.manual_seed(0)
        net = create_model("mnist-fast", c1=16, c2=32, c3=64, convs=convs)
        got = net.features.state_dict()
        assert list(got) == list(ref.state_dict())
        assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    ({"convs": [1, 2]}, "a list of three \\(one per stage\\), got \\[1, 2\\]"),
    ({"convs": [1, 0, 2]}, "convs must be >= 1"),
    ({"stem": "conv"}, "stem must be one of pool, patch, got 'conv'"),
    ({"act": "swish"}, "act must be one of gelu, relu, got 'swish'"),
])
def test_mnist_fast_rejects_bad_options(kwargs, message):
    with pytest.raises(ModelError, match=message):
        create_model("mnist-fast", **kwargs)


def test_fashion_recipe_builds_its_deeper_mnist_fast():
    """The recipe's model_args reach the factory: six convolutions, 28 px in, ten clothing classes out."""
    from cnnlab.config import resolve_config

    config = resolve_config("fashion-mnist-fast")
    model = create_model(config.model, **config.model_args)
    assert sum(isinstance(m, nn.Conv2d) for m in model.features) == 6
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_arguments_the_data_sets_are_refused_for_training():
    """A training config's model_args cannot set what the dataset decides; the message says which and why."""
    from cnnlab.models.registry import check_model_args, create_model_for_data

    with pytest.raises(ModelError, match=r"^model_args\.num_classes is set by the dataset \(10 classes\); remove it$"):
        create_model_for_data("lenet5", 10, (1, 28, 28), num_classes=5)
    with pytest.raises(ModelError, match=r"^model_args\.in_chans is set by the dataset \(1 channel\); remove it$"):
        create_model_for_data("lenet5", 10, (1, 28, 28), in_chans=3)
    with pytest.raises(ModelError, match=r"^model_args\.in_chans is set by the dataset; remove it$"):
        check_model_args("lenet5", {"in_chans": 3})  # before the data is loaded: no count to give
    # An unknown argument lists what a training config may set: not the two the data sets.
    with pytest.raises(ModelError, match=r"takes no argument\(s\) foo; it takes img_size$"):
        create_model_for_data("lenet5", 10, (1, 28, 28), foo=1)
    with pytest.raises(ModelError, match=r"it takes img_size, dropout$"):
        check_model_args("tf-estimator-cnn", {"width": 3})
    # Outside training they are ordinary arguments, and listed as such.
    with pytest.raises(ModelError, match="it takes num_classes, in_chans, img_size$"):
        create_model("lenet5", foo=1)


@pytest.mark.parametrize("name", ["lenet5", "tf2-convnet", "mnist-fast", "airbench"])
@pytest.mark.parametrize("side", [1, 4])
def test_an_input_too_small_for_the_model_names_the_smallest_it_takes(name, side):
    """One line naming the model, the size and the smallest size; that size builds and runs, one less does not."""
    message = rf"^model '{name}' takes inputs of at least (\d+)x\1, not {side}x{side};"
    with pytest.raises(ModelError, match=message) as e:
        create_model(name, img_size=side)
    smallest = int(str(e.value).split("at least ")[1].split("x")[0])
    model = create_model(name, img_size=smallest).eval()
    assert model(torch.zeros(2, *model.meta.input_size)).shape == (2, 10)
    if smallest - 1 > side:
        with pytest.raises(ModelError, match=f"at least {smallest}x{smallest}, not {smallest - 1}x{smallest - 1}"):
            create_model(name, img_size=smallest - 1)


def test_the_size_probe_waits_for_a_build_with_values():
    """On the meta device (a checkpoint's shape check) nothing runs; the real build refuses the size
    (test_checkpoint_schema: the same header ends in one line)."""
    with torch.device("meta"):
        assert create_model("mnist-fast", img_size=4).meta.input_size == (1, 4, 4)
    with pytest.raises(ModelError, match="^model 'mnist-fast' takes inputs of at least 8x8, not 4x4"):
        create_model("mnist-fast", img_size=4)


def test_the_size_probe_leaves_weights_and_random_draws_as_they_were():
    """The build's dry forward pass draws nothing: the same seed gives the same weights and next draw."""
    torch.manual_seed(3)
    a = create_model("mnist-fast")
    after_a = torch.rand(3)
    torch.manual_seed(3)
    b = create_model("mnist-fast")
    assert torch.equal(torch.rand(3), after_a)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.training and all(m.training for m in a.modules())  # handed back in train mode


@pytest.mark.parametrize("value", ["2,3", 2.5, True, [2, 3], 0, -4])
def test_img_size_must_be_one_whole_side(value):
    with pytest.raises(ModelError, match=r"^model 'mnist-fast': img_size must be a whole number >= 1 \(the side of "
                                         r"its square input\), got "):
        create_model("mnist-fast", img_size=value)
