"""Optional TensorBoard logging: a hook for ``fit(..., hooks=[TensorBoardLog(dir)])``.

Needs the ``tensorboard`` package (``pip install 'cnnlab[tensorboard]'``); view with
``tensorboard --logdir RUN_DIR/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


class TensorBoardLog:
    """Writes every record's numbers as TensorBoard scalars, tagged ``train/loss``, ``test/accuracy``, ...

    Train records give loss, acc, lr and samples_per_s; eval records give ``<split>/loss`` and
    ``<split>/accuracy``. The x axis is the optimisation step.
    """

    TRAIN_KEYS = ("loss", "acc", "lr", "samples_per_s")
    EVAL_KEYS = ("loss", "accuracy")

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch imports tensorboard lazily; it is an optional extra
            raise ConfigError("--tensorboard needs the tensorboard package: "
                              "pip install 'cnnlab[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_record(self, rec: dict) -> None:
        if rec["kind"] == "train":
            prefix, keys = "train", self.TRAIN_KEYS
        else:
            prefix, keys = rec.get("split", "eval"), self.EVAL_KEYS
        for k in keys:
            if k in rec:
                self.writer.add_scalar(f"{prefix}/{k}", float(rec[k]), rec["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
