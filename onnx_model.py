"""Prediction from an ONNX export (export.py) on onnxruntime, without torch.

    python predict.py --checkpoint model.onnx                    # predict with onnxruntime
    python serve.py --checkpoint model.onnx

The graph takes pixel values 0..255 as float32 [batch, 28, 28]; its two outputs are the calibrated
probabilities and the raw softmax (the report's "before"). The metadata holds the class names,
what the report tells of each model, whether test-time augmentation may mirror, and the leak
guard's fingerprint.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from cli import EVAL_BATCH_SIZE, Progress, UserError, class_names_problem, first_line

FORMAT = "mnist-csv-pipeline-onnx-1"
INPUT, OUTPUTS = "pixels", ["probabilities", "raw_probabilities"]
STORY_KEYS = {"checkpoint", "arch", "parameters", "temperature", "history", "epoch"}


def fingerprint(seen: dict | None) -> dict[str, np.ndarray] | None:
    """The leak guard's fingerprint from the metadata (base64 of int64 hashes)."""
    if seen is None:
        return None
    return {
        split: np.frombuffer(base64.b64decode(seen[split]), np.int64) for split in ("train", "val")
    }


def _shape(arg) -> str:
    return f"{arg.name} {arg.type} {arg.shape}"


def _gives(output, classes: int) -> bool:
    """Whether an output is float [batch, classes] (a named dimension may be anything)."""
    if output.type != "tensor(float)" or len(output.shape) != 2:
        return False
    return not isinstance(output.shape[1], int) or output.shape[1] == classes


def check_signature(session, classes: int, path: str) -> None:
    """Refuse a graph that does not take and give what this code feeds and reads: one input
    INPUT, float [batch, 28, 28] with a free batch; the OUTPUTS, float [batch, classes]."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    wanted = f"{INPUT} tensor(float) [batch, 28, 28]"
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(float)":
        raise UserError(f"{path}: the graph takes {', '.join(map(_shape, inputs))}, not {wanted}")
    batch, *rest = inputs[0].shape or [None]
    if isinstance(batch, int) or rest != [28, 28]:
        raise UserError(f"{path}: the graph takes {_shape(inputs[0])}, not {wanted}")
    fits = [o.name for o in outputs] == OUTPUTS and all(_gives(o, classes) for o in outputs)
    if not fits:
        raise UserError(
            f"{path}: the graph gives {', '.join(map(_shape, outputs))}, not "
            f"{' and '.join(OUTPUTS)} tensor(float) [batch, {classes}]"
        )


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, 28, 28] as the export's input."""
    return images.astype(np.float32)


class OnnxEnsemble:
    """An ONNX export on onnxruntime, in the shape of predict.Ensemble: probabilities of
    images, class names, the models' stories, the leak guard. Needs no torch but for --tta and
    the leak guard, so that serve.py starts without it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.onnx = self.session(Path(path).read_bytes(), path)
        meta = self.onnx.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise UserError(
                f"{path}: not an ONNX export of this project (make one with: python predict.py "
                "--export model.onnx)"
            )
        try:
            names = json.loads(meta["class_names"])
            problem = class_names_problem(names)
            if problem:
                raise ValueError(problem)
            self.class_names = tuple(names)
            self._stories = json.loads(meta["models"])
            self.mirror = bool(json.loads(meta["mirror"]))
            self.fingerprint = fingerprint(json.loads(meta["seen_rows"]))
            if not all(isinstance(name, str) for name in self.class_names):
                raise ValueError("class_names is not a list of names")
            for story in self._stories:
                history = story.get("history")
                if not story.keys() >= STORY_KEYS or not isinstance(history, list | None):
                    raise ValueError(f"a model's record lacks {', '.join(sorted(STORY_KEYS))}")
                story["checkpoint"] = f"{path} ({story['checkpoint']})"
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: damaged export metadata: {first_line(e)}") from None
        check_signature(self.onnx, len(self.class_names), path)

    @staticmethod
    def session(data: bytes, path: str | Path):
        """An onnxruntime session of the model in `data`; a file it cannot load, in one line."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"{path}: not a loadable ONNX model: {first_line(e)[:200]}") from None

    @property
    def paths(self) -> list[str]:
        return [self.path]

    def describe(self) -> str:
        return f"{self.path} (ONNX, {len(self._stories)} model(s))"

    def numerics(self) -> str:
        return "onnxruntime on the CPU (fp32)"

    def stories(self) -> list[dict]:
        return self._stories

    def seen_in_training(self, images: np.ndarray) -> dict | None:
        """The leak guard, from the fingerprint in the metadata."""
        import dataset

        return dataset.count_seen(self.fingerprint, images)

    def predict_proba(
        self, images: np.ndarray, tta: bool = False, batch_size: int = EVAL_BATCH_SIZE
    ) -> np.ndarray:
        return self.probabilities(images, tta, batch_size)[0]

    def probabilities(
        self,
        images: np.ndarray,
        tta: bool = False,
        batch_size: int = EVAL_BATCH_SIZE,
        progress: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated and raw probabilities [N, classes] of uint8 images [N, 28, 28], averaged
        over the test-time augmented views with `tta` (dataset.tta_views); `progress` labels
        the progress shown (cli.Progress), None shows none."""
        calibrated, raw = [], []
        starts = range(0, len(images), batch_size)
        with Progress(progress, len(starts)) as shown:
            for done, start in enumerate(starts, 1):
                batch = pixels(images[start : start + batch_size])
                views = self.tta_views(batch) if tta else [batch]
                outputs = [self.onnx.run(OUTPUTS, {INPUT: view}) for view in views]
                calibrated.append(np.mean([o[0] for o in outputs], axis=0))
                raw.append(np.mean([o[1] for o in outputs], axis=0))
                shown.step(done, start + len(batch))
        return np.concatenate(calibrated), np.concatenate(raw)

    def tta_views(self, batch: np.ndarray) -> list[np.ndarray]:
        """dataset.tta_views of a batch of pixels [B, 28, 28]."""
        import torch

        import dataset

        views = dataset.tta_views(torch.from_numpy(batch).unsqueeze(1), self.mirror)
        return [view[:, 0].numpy() for view in views]


def is_onnx(path: str) -> bool:
    """Whether a --checkpoint or --export path names an ONNX file."""
    return Path(path).suffix.lower() == ".onnx"
