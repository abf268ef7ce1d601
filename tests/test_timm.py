"""timm models and fine-tuning: a local weights file stands in for timm's hub download (nothing is downloaded).

One module-wide run trains ``timm:resnet18`` from that file on a folder of PNGs at 64 px, with the backbone frozen
for the first 2 of 4 steps at a tenth of the head's lr; evaluate, predict, ONNX export, serving and resuming
without the weights file are checked on it. The freeze, param-group and init_from rules are also checked
directly on a small timm model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm", reason="the 'timm' extra is not installed")

from cnnlab import checkpoint as ck  # noqa: E402
from cnnlab.cli import main  # noqa: E402
from cnnlab.config import TrainConfig  # noqa: E402
from cnnlab.errors import CheckpointError, ModelError  # noqa: E402
from cnnlab.infer import load_trained  # noqa: E402
from cnnlab.models import create_model, list_models  # noqa: E402
from cnnlab.train import finetune  # noqa: E402
from cnnlab.train.steps import make_optimizer, train_step  # noqa: E402

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
TINY = ["--no-progress", "--no-report", "--log_every=1", "--eval_batch_size=16"]


def write_folder(root: Path, per_class: int = 8) -> Path:
    """Class sub-folders of 40x48 PNGs: noise around each class's colour (the folder resizes them)."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict]:
    """An ImageNet-shaped (1000-class) resnet18 saved as .safetensors, as a downloaded file would be."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = timm.create_model("resnet18")
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def run(tmp_path_factory, weights) -> tuple[Path, Path, str]:
    """(run dir, image folder, dataset name): 4 steps, frozen for 2, backbone lr x0.1, a checkpoint every 2."""
    root = tmp_path_factory.mktemp("timmrun")
    folder = write_folder(root / "images")
    dataset = f"folder:{folder}?size=64&val=0.25"
    run_dir = root / "run"
    rc = main(["train", "--model", "timm:resnet18", f"--model_args.pretrained_file={weights[0]}",
               "--dataset", dataset, "--model-dir", str(run_dir), "--steps=4", "--batch_size=8",
               "--optimizer=adamw", "--lr=0.01", "--weight_decay=0.05", "--freeze_steps=2",
               "--backbone_lr_mult=0.1", "--ckpt_every=2", *TINY])
    assert rc == 0
    return run_dir, folder, dataset


def test_run_records_size_normalisation_and_no_weights_file(run):
    run_dir, _, _ = run
    _, meta = ck.load_checkpoint(ck.latest_checkpoint(run_dir))
    cfg = timm.create_model("resnet18").pretrained_cfg
    args = meta["model"]["args"]
    assert meta["model"]["name"] == "timm:resnet18" and meta["model"]["input_size"] == [3, 64, 64]
    assert args["img_size"] == 64 and args["num_classes"] == 3 and args["in_chans"] == 3
    assert args["mean"] == pytest.approx(cfg["mean"]) and args["std"] == pytest.approx(cfg["std"])
    assert args["interpolation"] == cfg["interpolation"]
    assert "pretrained_file" not in args and "pretrained" not in args
    trained = load_trained(run_dir)  # rebuilt from the header alone
    assert trained.model.meta.flexible_size and trained.model.meta.input_size == (3, 64, 64)


def test_backbone_starts_from_the_file_stays_frozen_then_trains(run, weights):
    run_dir, _, _ = run
    _, source = weights
    at = {ck.checkpoint_path(run_dir, s).name: ck.section(ck.load_checkpoint(ck.checkpoint_path(run_dir, s))[0],
                                                          "model") for s in (2, 4)}
    frozen, later = at["ckpt-00000002.safetensors"], at["ckpt-00000004.safetensors"]
    backbone = [k for k in source if not k.startswith("fc.")]
    for k in backbone:  # weights, biases and batch-norm running statistics all untouched while frozen
        assert torch.equal(frozen[f"features.net.{k}"], source[k]), k
    assert not torch.equal(later["features.net.conv1.weight"], source["conv1.weight"])
    assert not torch.equal(later["features.net.bn1.running_mean"], source["bn1.running_mean"])
    assert frozen["head.classifier.weight"].shape == (3, 512)  # a new head: the file's has 1000 classes


def test_backbone_lr_is_scaled_in_the_saved_optimiser(run):
    run_dir, _, _ = run
    _, meta = ck.load_checkpoint(ck.latest_checkpoint(run_dir))
    lrs = sorted({(g["lr_mult"], g["lr"]) for g in meta["optimizer"]["param_groups"]})
    (m1, lr1), (m2, lr2) = lrs
    assert (m1, m2) == (0.1, 1.0) and lr1 == pytest.approx(0.1 * lr2)


def test_evaluate_predict_and_resume_without_the_weights_file(run, tmp_path, capsys):
    run_dir, folder, dataset = run
    assert main(["evaluate", str(run_dir)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    image = folder / "red" / "0.png"
    assert main(["predict", str(run_dir), str(image), "--json", "--top-k", "3"]) == 0
    pred = json.loads(capsys.readouterr().out)[0]
    assert pred["label"] in COLOURS and len(pred["top_k"]) == 3
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    rc = main(["train", "--model", "timm:resnet18", f"--model_args.pretrained_file={tmp_path / 'gone.pth'}",
               "--dataset", dataset, "--model-dir", str(copy), "--steps=5", "--batch_size=8",
               "--optimizer=adamw", "--lr=0.01", "--weight_decay=0.05", "--freeze_steps=2",
               "--backbone_lr_mult=0.1", "--ckpt_every=2", *TINY])
    assert rc == 0
    assert "resuming from ckpt-00000004" in capsys.readouterr().out
    assert ck.latest_checkpoint(copy).name == "ckpt-00000005.safetensors"


def test_onnx_export_with_parity(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed")
    run_dir, _, _ = run
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert out.is_file() and "parity" in capsys.readouterr().out


def test_served_predictions_match_the_python_api(run):
    pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
    import http.client

    from cnnlab import Classifier
    from cnnlab.serve import background_server, create_app

    run_dir, folder, _ = run
    png = (folder / "blue" / "1.png").read_bytes()
    want = Classifier(model_dir=run_dir).predict([folder / "blue" / "1.png"])[0]
    with background_server(create_app(run_dir)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/predict", body=png, headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        got = json.loads(resp.read())
        conn.close()
    assert resp.status == 200 and got["label"] == want["label"]
    assert np.allclose(got["probabilities"], want["probabilities"], atol=1e-5)


# ----------------------------------------------------------------------------- units on a small timm model


def small(num_classes: int = 3, **kw):
    torch.manual_seed(0)
    return create_model("timm:resnet10t", num_classes=num_classes, in_chans=3, img_size=32, **kw)


def test_model_normalises_inside_and_has_features_and_head():
    m = small(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]).eval()
    x = torch.rand(2, 3, 32, 32)
    net, head = m.features.net, m.head
    want = head(net.forward_features((x - 0.5) / 0.25))
    assert torch.allclose(m(x), want, atol=1e-6)
    assert {k.split(".")[0] for k in m.state_dict()} == {"features", "head"}
    assert [k for k in m.state_dict() if k.startswith("head.")] == ["head.classifier.weight", "head.classifier.bias"]
    grey = create_model("timm:resnet10t", num_classes=2, in_chans=1, img_size=32).eval()
    assert len(grey.meta.args["mean"]) == 1 and grey(torch.rand(1, 1, 32, 32)).shape == (1, 2)


def test_unknown_names_and_missing_files_are_one_line():
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet19'; did you mean timm:resnet18"):
        create_model("timm:resnet19")
    with pytest.raises(ModelError, match="pretrained_file .*no such file"):
        create_model("timm:resnet10t", pretrained_file="/nonexistent/w.safetensors")
    assert "timm:resnet18" in list_models("timm:resnet1*") and "lenet5" not in list_models("timm:*")


def test_models_cli_lists_timm_names(capsys):
    assert main(["models", "timm:resnet1*"]) == 0
    assert "timm:resnet18" in capsys.readouterr().out.split()
    assert main(["models", "timm:nothing-like-this*"]) == 2


def test_param_groups_scale_the_backbone_lr():
    m = small()
    opt = make_optimizer(TrainConfig(optimizer="adamw", lr=0.01, backbone_lr_mult=0.1, weight_decay=0.05), m)
    head, backbone = opt.param_groups[:2], opt.param_groups[2:]
    ids = lambda groups: {id(p) for g in groups for p in g["params"]}  # noqa: E731
    assert ids(head) == {id(p) for p in m.head.parameters()}
    assert ids(backbone) == {id(p) for p in m.features.parameters()}
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.05, 0.0]
    assert len(make_optimizer(TrainConfig(optimizer="adamw"), m).param_groups) == 2  # plain runs: as before


def test_freeze_steps_then_unfreeze():
    m = small().train()
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1), m)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    bn = m.features.net.bn1
    for step in range(4):
        finetune.apply_freeze(m, step, 2)
        stats = bn.running_mean.clone()
        conv = m.features.net.conv1[0].weight.clone()
        head = m.head.classifier.weight.clone()
        train_step(m, opt, x, y)
        moved = not torch.equal(conv, m.features.net.conv1[0].weight)
        assert not torch.equal(head, m.head.classifier.weight)
        if step < 2:
            assert not bn.training and torch.equal(stats, bn.running_mean) and not moved
            assert all(p.grad is None for p in m.features.parameters())
        else:
            assert bn.training and not torch.equal(stats, bn.running_mean) and moved
    assert finetune.frozen_steps(TrainConfig(freeze_epochs=1.5, batch_size=10), 100) == 15


def save_run(path: Path, model, classes: list[str]) -> Path:
    return ck.save_checkpoint(path, model=model, optimizer=None, step=1, config={},
                              data={"dataset": "x", "classes": classes, "shape": [3, 32, 32]})


def test_init_from_replaces_the_head_for_other_classes(tmp_path):
    source = small(num_classes=5)
    file = save_run(tmp_path / "ckpt-00000001.safetensors", source, list("abcde"))
    same = small(num_classes=5, mean=[0.1, 0.2, 0.3])
    finetune.init_from(same, str(tmp_path), list("abcde"))  # a run directory, the same classes: all copied
    assert torch.equal(same.head.classifier.weight, source.head.classifier.weight)
    assert same.meta.args["mean"] == [0.1, 0.2, 0.3]  # normalisation is the new model's own
    for target, classes in ((small(num_classes=3), list("xyz")), (small(num_classes=5), list("vwxyz"))):
        fresh = target.head.classifier.weight.clone()
        msg = finetune.init_from(target, str(file), classes)
        assert "new classifier head.classifier.bias, head.classifier.weight" in msg
        assert torch.equal(target.head.classifier.weight, fresh)
        assert torch.equal(target.features.net.conv1[0].weight, source.features.net.conv1[0].weight)


def test_init_from_a_run_takes_its_best_checkpoint(tmp_path):
    newest, best = small(num_classes=5), small(num_classes=5)
    with torch.no_grad():
        best.head.classifier.weight.add_(1.0)  # tell the two apart
    save_run(tmp_path / "ckpt-00000009.safetensors", newest, list("abcde"))
    target = small(num_classes=5)
    finetune.init_from(target, str(tmp_path), list("abcde"))  # no best file: the newest checkpoint
    assert torch.equal(target.head.classifier.weight, newest.head.classifier.weight)
    save_run(tmp_path / ck.BEST_NAME, best, list("abcde"))
    finetune.init_from(target, str(tmp_path), list("abcde"))
    assert torch.equal(target.head.classifier.weight, best.head.classifier.weight)


def test_init_from_mismatch_is_one_line(tmp_path):
    file = save_run(tmp_path / "a.safetensors", small(), list("abc"))
    grey = create_model("timm:resnet10t", num_classes=3, in_chans=1, img_size=32)
    with pytest.raises(CheckpointError, match=r"features\.net\.conv1\.0\.weight has shape \(24, 3, 3, 3\), "
                                              r"the model's is \(24, 1, 3, 3\)$"):
        finetune.init_from(grey, str(file), list("abc"))
    with pytest.raises(CheckpointError, match=r"it has no features\.net\.conv1\.weight"):
        finetune.init_from(create_model("timm:resnet18", num_classes=3, img_size=32), str(file), list("abc"))
    with pytest.raises(CheckpointError, match="no such run directory"):
        finetune.init_from(small(), str(tmp_path / "missing"), list("abc"))


def test_train_init_from_cli(tmp_path, capsys, run):
    run_dir, _, dataset = run
    new = tmp_path / "new"
    rc = main(["train", "--model", "timm:resnet18", "--dataset", dataset, "--model-dir", str(new), "--steps=1",
               "--batch_size=4", "--init-from", str(run_dir), *TINY])
    assert rc == 0 and f"initialised from {run_dir}" in capsys.readouterr().out
    rc = main(["train", "--model", "timm:resnet10t", "--dataset", dataset, "--model-dir", str(tmp_path / "bad"),
               "--steps=1", "--init-from", str(run_dir), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "init_from" in err


def test_hub_failure_is_one_line(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("cannot reach the hub\ndetails that would make a traceback")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(ModelError, match=r"^cannot build timm:resnet10t with pretrained weights: "
                                         r"cannot reach the hub$"):
        create_model("timm:resnet10t", pretrained=True)


def test_folder_without_size_takes_the_pretrained_input_size():
    from cnnlab.config import TrainConfig
    from cnnlab.train.loop import sized_dataset
    cfg = TrainConfig(model="timm:resnet18", dataset="folder:/photos")
    assert sized_dataset(cfg).dataset == "folder:/photos?size=224x224"  # resnet18's pretrained config
    cfg = TrainConfig(model="timm:resnet18", dataset="folder:/photos", model_args={"img_size": 64})
    assert sized_dataset(cfg).dataset == "folder:/photos?size=64x64"
    cfg = TrainConfig(model="timm:resnet18", dataset="folder:/photos?size=32")
    assert sized_dataset(cfg) is cfg  # a size given is kept
    # Random-resized crops: decoded larger only when the model keeps its size (built at the data's, it would grow).
    cfg = TrainConfig(model="timm:resnet18", dataset="folder:/photos", random_resized_crop=(0.35, 1.0))
    assert sized_dataset(cfg).dataset == "folder:/photos?size=224x224"
    cfg = TrainConfig(model="timm:resnet18", dataset="folder:/photos", random_resized_crop=(0.35, 1.0),
                      model_args={"img_size": 224})
    assert sized_dataset(cfg).dataset == "folder:/photos?size=256x256"
