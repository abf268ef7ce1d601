"""Checkpoint headers are checked before anything is built from them (fault catalogue: hostile checkpoints).

Each malformed header ends in a `CheckpointError` and, from the CLI, one line and exit 2; no real model is
allocated for a header that fails (the model factory is watched), and random mutations of a valid header give
either that clean error or a model that loads.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runs import train_tiny_run
from safetensors.torch import save_file

from cnnlab import checkpoint as ck
from cnnlab import infer as restore  # where a trained run is loaded and its model built
from cnnlab.checkpoint_schema import check_finite, validate_checkpoint, validate_header
from cnnlab.cli import main
from cnnlab.errors import CheckpointError

pytestmark = pytest.mark.robust


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[dict, dict]:
    """(tensors, header) of a tiny trained lenet5 checkpoint."""
    run = train_tiny_run(tmp_path_factory.mktemp("schema"))
    return ck.load_checkpoint(ck.latest_checkpoint(run))


def _set(header: dict, path: str, value) -> dict:
    """A copy of ``header`` with the dotted ``path`` set to ``value`` (or deleted when value is _DEL)."""
    h = copy.deepcopy(header)
    *parents, last = path.split(".")
    d = h
    for p in parents:
        d = d[p]
    if value is _DEL:
        del d[last]
    else:
        d[last] = value
    return h


_DEL = object()

# (dotted path, new value, words the message must contain)
MALFORMED = [
    ("format_version", "1", "format_version must be int"),
    ("format_version", 0, "format_version must be at least 1"),
    ("step", -5, "step must be"),
    ("model", _DEL, "model is missing"),
    ("model.args", _DEL, "model.args is missing"),
    ("model.name", 7, "model.name must be str"),
    ("model.args", {"img_size": 100_000}, "model.args.img_size must be an integer from 1 to 4096"),
    ("model.args", {"img_size": 1500}, "does not match the model"),  # in bounds, but its weights are not here
    ("model.args", {"dropout": float("nan")}, "model.args.dropout is nan"),
    ("model.args", {"dropout": {"p": 0.1}}, "model.args.dropout must be a number"),
    ("model.args", {"img_size": [28, 10**6]}, "model.args.img_size must be an integer from 1 to 4096"),
    ("model.args", {"pretrained_file": "/etc/passwd"}, "chooses starting weights"),
    ("model.args", {"pretrained": True}, "chooses starting weights"),
    ("model.name", "spec:/tmp/net.toml", "spec file path"),
    ("model.name", "spec:in1x100000x100000-conv4k3-fc10", "out of range"),
    ("model.name", "lenet5\nx", "printable"),
    ("model.num_classes", 10**9, "model.num_classes must be 1 to"),
    ("model.input_size", [1, 28], "model.input_size must be [C, H, W]"),
    ("data.shape", [1, 20000, 20000], "data.shape [1, 20000, 20000] is out of range"),
    ("data.shape", [3, 28, 28], "data.shape has 3 channels"),
    ("data.classes", [str(i) for i in range(9)], "names 9 classes but the model has 10 outputs"),
    ("data.classes", [None] * 10, "data.classes[0] must be a string"),
    ("data", _DEL, "data is missing"),
    ("config", {"lr": "fast"}, "config: bad value for lr"),
    ("config", {"learning_rate": 0.1}, "unknown config key"),
    ("config", {"lr": -1.0}, "lr must be > 0"),
    ("optimizer", {"param_groups": 3}, "optimizer.param_groups must be list"),
    ("extra", [], "extra must be an object"),
]


@pytest.mark.parametrize("path,value,needle", MALFORMED, ids=[f"{p}={str(v)[:24]}" for p, v, _ in MALFORMED])
def test_malformed_header_is_refused_before_any_model_is_built(valid, tmp_path, capsys, monkeypatch, path, value,
                                                               needle):
    tensors, header = valid
    bad = _set(header, path, value)
    built = []
    monkeypatch.setattr(restore, "create_model", lambda *a, **kw: built.append(a) or pytest.fail("model built"))
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        validate_checkpoint(bad, tensors)
    file = tmp_path / "ckpt-00000004.safetensors"
    save_file(tensors, str(file), metadata={"cnnlab": json.dumps(bad)})
    code = main(["evaluate", str(file)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("cnnlab: error: "), err
    assert needle.split("[")[0] in err and not built


def test_spec_path_in_a_header_is_never_opened(valid, tmp_path, monkeypatch):
    # A FIFO: opening it for reading would block forever; the header check must not get that far.
    fifo = tmp_path / "net.toml"
    os.mkfifo(fifo)
    from cnnlab.models import spec
    monkeypatch.setattr(spec, "spec_from_toml", lambda p: pytest.fail(f"read {p}"))
    tensors, header = valid
    with pytest.raises(CheckpointError, match="spec file path"):
        validate_checkpoint(_set(header, "model.name", f"spec:{fifo}"), tensors)


def test_nan_and_inf_weights_are_refused(valid):
    tensors, header = valid
    for value in (math.nan, math.inf):
        bad = dict(tensors)
        key = next(k for k in bad if k.startswith("model/"))
        bad[key] = bad[key].clone().view(-1).index_fill(0, torch.tensor([0]), value).view_as(tensors[key])
        with pytest.raises(CheckpointError, match=f"weights {key} hold NaN or infinite"):
            validate_checkpoint(header, bad)
    check_finite({"rng/torch": torch.zeros(4, dtype=torch.uint8), "optim/0/step": torch.tensor(math.inf)})


def test_deeply_nested_header_json_is_one_line(valid, tmp_path, capsys):
    tensors, _ = valid
    file = tmp_path / "ckpt-00000001.safetensors"
    save_file(tensors, str(file), metadata={"cnnlab": "[" * 200_000 + "]" * 200_000})
    assert main(["evaluate", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt checkpoint header" in err


def test_header_that_is_not_an_object(valid):
    with pytest.raises(CheckpointError, match="not an object"):
        validate_header([1, 2, 3])


def test_valid_header_passes(valid):
    tensors, header = valid
    validate_checkpoint(header, tensors)


# --- property-based: random mutations of a valid header ------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats() | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=8)


def _paths(d, prefix=()) -> list[tuple]:
    """Every key path of a nested header (into dicts and lists)."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_give_a_clean_error_or_a_loadable_model(valid, data):
    tensors, header = valid
    h = copy.deepcopy(header)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(h)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = h
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(_json)
    try:
        validate_checkpoint(h, tensors)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    # Accepted: the model it names must then really build and take the weights.
    model = restore.create_model(h["model"]["name"], **h["model"]["args"])
    ck.load_state_strict(model, ck.section(tensors, "model"), "mutated")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_random_header_text_is_a_clean_error(tmp_path_factory, text):
    file = Path(tmp_path_factory.mktemp("h")) / "ckpt-00000001.safetensors"
    save_file({"model/x": torch.zeros(1)}, str(file), metadata={"cnnlab": text})
    with pytest.raises(CheckpointError):
        ck.load_checkpoint(file)



@pytest.fixture(scope="module")
def bn_run(tmp_path_factory) -> Path:
    """A tiny trained mnist-fast run: batch norms, and a head that takes any input size."""
    return train_tiny_run(tmp_path_factory.mktemp("bn"), steps=2, ckpt_every=2, extra=["--model=mnist-fast"])


def test_the_shape_check_runs_no_forward_pass_on_the_meta_device(bn_run):
    """Checking a checkpoint's weights against its header builds the model on the meta device only: a forward
    pass there (the size probe of a real build) would import torch's compiler stack, over a second of every
    `cnnlab predict`, `report` and `serve` start. Fresh process."""
    import subprocess
    import sys

    code = ("import sys; from cnnlab import checkpoint as ck; ck.load_checkpoint(ck.latest_checkpoint(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code, str(bn_run)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_header_with_an_input_too_small_for_its_net_is_refused_in_one_line(bn_run, tmp_path, capsys):
    """mnist-fast's weights fit any input size, so the shape check passes; the real build's probe refuses it."""
    tensors, header = ck.load_checkpoint(ck.latest_checkpoint(bn_run))
    bad = _set(_set(header, "model.args.img_size", 4), "model.input_size", [1, 4, 4])
    file = tmp_path / "ckpt-00000002.safetensors"
    save_file(tensors, str(file), metadata={"cnnlab": json.dumps(bad)})
    code = main(["evaluate", str(file)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "model 'mnist-fast' takes inputs of at least 8x8, not 4x4" in err
