"""The muon optimiser: the orthogonalised filter step, SGD for the rest, its groups, and resuming a run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab import create_model, train_step
from cnnlab.config import make_config, resolve_config
from cnnlab.errors import ConfigError
from cnnlab.train.muon import Muon, orthogonalize
from cnnlab.train.steps import make_optimizer


def _alignment(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.flatten() @ y.flatten() / (x.norm() * y.norm())).item()


@pytest.mark.parametrize("shape", [(64, 288), (288, 64), (16, 1, 3, 3), (32, 16, 3, 3)])
def test_orthogonalize_gives_the_polar_factor_approximately(shape):
    gen = torch.Generator().manual_seed(0)
    rows, cols = shape[0], torch.Size(shape[1:]).numel()
    k = min(rows, cols)
    u0, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v0, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    # a gradient's spectrum is skewed: a few strong directions, many weak ones
    g = (u0 * torch.logspace(1, -2, k) @ v0.T).reshape(shape)
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    u, _, vt = torch.linalg.svd(g.reshape(shape[0], -1), full_matrices=False)
    polar = u @ vt
    singular = torch.linalg.svdvals(o.reshape(shape[0], -1))
    # Jordan's coefficients trade exactness for speed: five steps bring singular values spread 1000-fold to
    # within 10-fold of each other (near 1 for the strong directions), not all to 1
    assert singular.max() < 1.3 and singular.max() / singular.min() < 10
    assert _alignment(o.reshape(polar.shape), polar) > 0.9
    assert _alignment(o.reshape(polar.shape), g.reshape(polar.shape)) < 0.7  # weak directions now count as much
    assert torch.allclose(orthogonalize(3.0 * g), o, atol=1e-5)  # the gradient's scale does not matter


def _steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], n: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_groups_that_are_not_orthogonal_step_as_nesterov_sgd():
    torch.manual_seed(0)
    a = [torch.randn(8, 4, 3, 3), torch.randn(10, 8), torch.randn(10)]
    b = [t.clone() for t in a]
    _steps(Muon([{"params": a}], lr=0.1, momentum=0.9, weight_decay=5e-4), a)
    _steps(torch.optim.SGD([{"params": b}], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True), b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6)


def test_an_orthogonal_group_steps_along_the_orthogonalised_update_with_decoupled_decay():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    before = w.clone()
    opt = Muon([{"params": [w], "orthogonal": True}], lr=0.2, momentum=0.6, weight_decay=0.01)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    opt.step()
    # first step: the buffer is the gradient, the Nesterov update (1 + momentum) times it
    expected = before * (1 - 0.2 * 0.01) - 0.2 * orthogonalize(1.6 * w.grad)
    assert torch.allclose(w, expected, atol=1e-6)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    buf = opt.state[w]["momentum_buffer"].clone() * 0.6 + w.grad
    previous = w.clone()
    opt.step()
    assert torch.allclose(w, previous * (1 - 0.2 * 0.01) - 0.2 * orthogonalize(w.grad + 0.6 * buf), atol=1e-6)


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_a_normalized_orthogonal_group_rescales_the_weight_to_norm_sqrt_rows_and_takes_no_decay(decay):
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 5
    before = w.clone()
    opt = Muon([{"params": [w], "orthogonal": True, "normalize": True}], lr=0.2, momentum=0.6,
               weight_decay=decay)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    opt.step()
    expected = before * (8 ** 0.5 / before.norm()) - 0.2 * orthogonalize(1.6 * w.grad)
    assert torch.allclose(w, expected, atol=1e-6)
    assert before.norm() > 30 and w.norm() < 4  # 5x the scale before, about sqrt(8) after


def test_muon_norm_reaches_the_filter_groups_only_and_needs_muon():
    model = create_model("mnist-fast", c1=8, c2=8, c3=8)
    opt = make_optimizer(make_config({"optimizer": "muon", "lr": 0.05, "muon_norm": True}), model)
    assert [g["normalize"] for g in opt.param_groups] == [g["orthogonal"] for g in opt.param_groups]
    assert any(g["normalize"] for g in opt.param_groups)
    plain = make_optimizer(make_config({"optimizer": "muon", "lr": 0.05}), model)
    assert not any(g["normalize"] for g in plain.param_groups)
    with pytest.raises(ConfigError, match="muon_norm needs optimizer = muon"):
        make_config({"optimizer": "nesterov", "muon_norm": True})


def test_an_optimiser_state_saved_before_muon_norm_still_steps():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    opt = Muon([{"params": [w], "orthogonal": True}], lr=0.2, momentum=0.6, weight_decay=0.01)
    w.grad = torch.ones_like(w)
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["normalize"]  # as a checkpoint written before the option holds it
    again = Muon([{"params": [w], "orthogonal": True}], lr=0.2, momentum=0.6, weight_decay=0.01)
    again.load_state_dict(state)
    before = w.clone()
    again.step()
    assert not torch.equal(w, before) and torch.isfinite(w).all()


def test_make_optimizer_puts_the_filters_in_orthogonal_groups_at_the_muon_rate():
    model = create_model("mnist-fast", c1=8, c2=8, c3=8, convs=2)
    config = make_config({"optimizer": "muon", "lr": 0.05, "momentum": 0.9, "muon_lr": 0.3, "muon_momentum": 0.5,
                          "weight_decay": 5e-4})
    opt = make_optimizer(config, model)
    assert not opt.param_groups[0]["orthogonal"]
    assert opt.param_groups[0]["lr"] == 0.05  # the training log reports the first group's rate
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    for group in opt.param_groups:
        filters = group["orthogonal"]
        assert all((p.ndim == 4) == filters for p in group["params"])
        assert group["momentum"] == (0.5 if filters else 0.9)
        assert group["lr"] == pytest.approx(0.3 if filters else 0.05)
        assert group["lr"] == pytest.approx(config.lr * group["lr_mult"])  # the schedule scales both rates
    assert sum(len(g["params"]) for g in opt.param_groups if g["orthogonal"]) == sum(
        isinstance(m, nn.Conv2d) for m in model.modules())



@pytest.mark.parametrize("optimizer", ["nesterov", "muon"])
def test_norm_lr_mult_scales_the_rate_of_biases_and_norms_only(optimizer):
    model = create_model("mnist-fast", c1=8, c2=8, c3=8)
    config = make_config({"optimizer": optimizer, "lr": 0.05, "muon_lr": 0.3, "norm_lr_mult": 16})
    opt = make_optimizer(config, model)
    assert opt.param_groups[0]["lr"] == 0.05
    for group in opt.param_groups:
        ndim = {p.ndim for p in group["params"]}
        expected = 0.05 * 16 if ndim == {1} else 0.3 if ndim == {4} and optimizer == "muon" else 0.05
        assert group["lr"] == pytest.approx(expected)
        assert group["lr"] == pytest.approx(config.lr * group["lr_mult"])  # the schedule scales it too
    assert any({p.ndim for p in g["params"]} == {1} for g in opt.param_groups)
    with pytest.raises(ConfigError, match="norm_lr_mult"):
        make_config({"norm_lr_mult": 0})


def test_cifar10_94_trains_each_part_at_the_rate_its_recipe_states():
    """The recipe reaches airbench94's rates through lr, backbone_lr_mult, muon_lr and norm_lr_mult: the
    classifier at 1.6, the filters at 0.24 (Muon), the norm shifts and the whitening bias at 0.4 x 64."""
    config = resolve_config("cifar10-94")
    model = create_model(config.model, **config.model_args)
    rate = {id(p): g["lr"] for g in make_optimizer(config, model).param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 1.6 if name.startswith("head") else 0.24 if p.ndim == 4 else 0.4 * 64
        assert rate[id(p)] == pytest.approx(expected), name
    scales = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert scales and not any(w.requires_grad for w in scales)  # bn_scale = false: only the shifts train


def test_muon_trains_a_net_and_leaves_grad_mode_on():
    torch.manual_seed(0)
    model = create_model("mnist-fast", c1=8, c2=8, c3=8)
    opt = make_optimizer(make_config({"optimizer": "muon", "lr": 0.05}), model)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 10
    first = train_step(model, opt, x, y)[0].item()
    for _ in range(20):
        last = train_step(model, opt, x, y)[0].item()
    assert torch.is_grad_enabled()
    assert last < 0.5 * first  # it fits one batch


@pytest.mark.parametrize("values", [{"muon_lr": 0.0}, {"muon_momentum": 1.0}, {"muon_momentum": -0.1}])
def test_bad_muon_settings_are_refused(values):
    with pytest.raises(ConfigError, match="muon_"):
        make_config({"optimizer": "muon", **values})
