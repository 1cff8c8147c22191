"""ONNX export of trained checkpoints, and prediction from the export with onnxruntime.

    python predict.py --export model.onnx                        # models/best.pt as ONNX
    python predict.py --checkpoint a.pt b.pt --export ens.onnx   # an ensemble, averaged inside
    python predict.py --checkpoint model.onnx                    # predict with onnxruntime

The graph takes pixel values 0..255 as float32 [batch, 28, 28] and holds everything else:
each member's normalization, network and temperature, and the average over members. Its two
outputs are the calibrated probabilities and the raw softmax (the report's "before"). The
metadata holds the class names and what the report tells of each model. An export is checked
against PyTorch on real digits before it is written.
"""

from __future__ import annotations

import base64
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from atomic import atomic_write
from cli import UserError, first_line

FORMAT = "mnist-csv-pipeline-onnx-1"
TOLERANCE = 1e-4  # the largest difference in a probability onnxruntime may show against PyTorch
INPUT, OUTPUTS = "pixels", ["probabilities", "raw_probabilities"]
BATCH_SIZE = 1024  # dataset.EVAL_BATCH_SIZE (dataset imports torch, which this module avoids)


def export(ensemble, path: Path) -> dict:
    """Write `ensemble` (a predict.Ensemble in fp32 on the CPU) as ONNX to `path`, atomically,
    once onnxruntime's probabilities match PyTorch's within TOLERANCE on real digits."""
    import dataset

    data = to_onnx(ensemble, path)
    check = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_test.csv.gz")  # real digits
    expected = ensemble.predict_proba(check.images)
    got = OnnxEnsemble.session(data, path).run(OUTPUTS[:1], {INPUT: pixels(check.images)})[0]
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        raise UserError(
            f"{path}: onnxruntime's probabilities differ from PyTorch's by {difference:.1e} "
            f"(more than {TOLERANCE:g}); nothing written"
        )
    with atomic_write(path) as f:
        f.write(data)
    print(
        f"wrote {path} ({len(data) / 1e6:.1f} MB, {len(ensemble.members)} model(s)): onnxruntime "
        f"matches PyTorch within {difference:.1e} on {len(check):,} real digits"
    )
    return {"export": str(path), "max_difference": difference, "checked_rows": len(check)}


def to_onnx(ensemble, path: Path) -> bytes:
    """The ensemble as one graph (predict.EnsembleGraph) through torch.onnx, for any batch size,
    with its metadata."""
    import onnx
    import torch

    import predict

    graph = predict.EnsembleGraph(ensemble.members).eval()
    exporter_log = logging.getLogger("torch.onnx")  # notes of operators this graph does not use
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (torch.zeros(2, 28, 28),),
                input_names=[INPUT],
                output_names=OUTPUTS,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                verbose=False,
            )
    except Exception as e:  # torch.onnx's own failures, in one line
        raise UserError(f"{path}: torch.onnx could not export: {first_line(e)[:200]}") from None
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(ensemble))
    return proto.SerializeToString()


def metadata(ensemble) -> dict[str, str]:
    """The export's metadata: the class names, each member's story for the report, whether
    test-time augmentation may mirror, and the leak guard's fingerprint."""
    import predict

    fingerprint = ensemble.seen_fingerprint()
    return {
        "format": FORMAT,
        "class_names": json.dumps(list(ensemble.class_names)),
        "models": json.dumps([predict.model_story(m) for m in ensemble.members]),
        "mirror": json.dumps(all(m.mirror for m in ensemble.members)),
        "seen_rows": json.dumps(
            None
            if fingerprint is None
            else {k: base64.b64encode(v.tobytes()).decode() for k, v in fingerprint.items()}
        ),
    }


STORY_KEYS = {"checkpoint", "arch", "parameters", "temperature", "history", "epoch"}


def fingerprint(seen: dict | None) -> dict[str, np.ndarray] | None:
    """The leak guard's fingerprint from the metadata (base64 of int64 hashes)."""
    if seen is None:
        return None
    return {
        split: np.frombuffer(base64.b64decode(seen[split]), np.int64) for split in ("train", "val")
    }


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
            self.class_names = tuple(json.loads(meta["class_names"]))
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
        import predict

        return predict.count_seen(self.fingerprint, images)

    def predict_proba(
        self, images: np.ndarray, tta: bool = False, batch_size: int = BATCH_SIZE
    ) -> np.ndarray:
        return self.probabilities(images, tta, batch_size)[0]

    def probabilities(
        self, images: np.ndarray, tta: bool = False, batch_size: int = BATCH_SIZE
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated and raw probabilities [N, classes] of uint8 images [N, 28, 28], averaged
        over the test-time augmented views with `tta` (predict.tta_views)."""
        calibrated, raw = [], []
        for start in range(0, len(images), batch_size):
            batch = pixels(images[start : start + batch_size])
            views = self.tta_views(batch) if tta else [batch]
            outputs = [self.onnx.run(OUTPUTS, {INPUT: view}) for view in views]
            calibrated.append(np.mean([o[0] for o in outputs], axis=0))
            raw.append(np.mean([o[1] for o in outputs], axis=0))
        return np.concatenate(calibrated), np.concatenate(raw)

    def tta_views(self, batch: np.ndarray) -> list[np.ndarray]:
        """predict.tta_views of a batch of pixels [B, 28, 28]."""
        import torch

        import predict

        views = predict.tta_views(torch.from_numpy(batch).unsqueeze(1), self.mirror)
        return [view[:, 0].numpy() for view in views]


def is_onnx(path: str) -> bool:
    """Whether a --checkpoint or --export path names an ONNX file."""
    return Path(path).suffix.lower() == ".onnx"
