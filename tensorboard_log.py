"""TensorBoard logging of a training run (train.py --tensorboard DIR): scalars every epoch, and at
the end the run's settings as hyperparameters with its results, the training curves and the
validation confusion matrix as images. The tensorboard package is an optional extra."""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

import numpy as np

from cli import UserError

INSTALL = "pip install tensorboard==2.21.0"
# history column -> TensorBoard tag
SCALARS = {
    "train_loss": "loss/training",
    "val_loss": "loss/validation",
    "val_loss_calibrated": "loss/validation_calibrated",
    "train_acc": "accuracy/training",
    "val_acc": "accuracy/validation",
    "lr": "learning_rate",
    "images_per_s": "throughput/training_images_per_s",
}


def require() -> None:
    """Refuse --tensorboard in one line, with the install command, when the package is absent."""
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise UserError(
            f"--tensorboard: the tensorboard package is not installed ({INSTALL})"
        ) from None


def run_name(arch: str, seed: int) -> str:
    """A new run's folder inside the TensorBoard directory: when it started, what it trains."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{arch}-seed{seed}"


def boards(cfg, earlier: str | None, first_epoch: int) -> list[Board]:
    """The board that a run of `cfg` (a config.Config) asks for with --tensorboard, in its own
    folder: a new one, or the `earlier` one that a resumed run continues; or none."""
    if cfg.tensorboard is None:
        return []
    log_dir = Path(cfg.tensorboard) / (earlier or run_name(cfg.arch, cfg.seed))
    print(f"TensorBoard: {log_dir} (tensorboard --logdir {cfg.tensorboard})")
    return [Board(log_dir, first_epoch)]


class Board:
    """A training run's watcher (train.Watcher) writing the event files of the run in
    `log_dir`; a resumed run (`first_epoch` > 1) drops what its killed predecessor logged from
    that epoch on."""

    def __init__(self, log_dir: Path, first_epoch: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.name = log_dir.name
        self.writer = SummaryWriter(str(log_dir), purge_step=first_epoch)

    def epoch(self, row: dict, epochs: int) -> None:
        """One epoch's history row as scalars at step `epoch`."""
        for key, tag in SCALARS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def finish(self, end) -> None:
        """The run's settings as hyperparameters with its results, the training curves and the
        confusion matrix of the kept network on the validation split (a train.RunEnd); then
        close the files."""
        step = end.history[-1]["epoch"]
        names = end.class_names
        cm = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(cm, (end.val_labels, end.val_logits.argmax(1)), 1)
        with tempfile.TemporaryDirectory() as folder:
            import plots

            curves = Path(folder) / "curves.png"
            plots.training_curves(end.history, end.best_epoch, curves, end.curves)
            matrix = plots.confusion_matrices(cm, names, Path(folder) / "confusion.png")
            for tag, path in (("training_curves", curves), ("confusion_matrix/validation", matrix)):
                self.writer.add_image(tag, png_pixels(path), step, dataformats="HWC")
        settings = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in end.config.items()
        }
        results = {f"hparam/{k}": v for k, v in end.summary.items() if type(v) in (int, float)}
        self.writer.add_hparams(settings, results, run_name=".", global_step=step)
        self.writer.close()


def png_pixels(path: Path) -> np.ndarray:
    """A PNG's RGB pixels, [height, width, 3] uint8."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
