"""Predict with trained checkpoints: a Kaggle submission CSV, the evaluation report for labelled
input, and predictions for your own images.

    python predict.py                                  # models/best.pt on the found test CSV
    python predict.py --input data/test.csv --output submissions/digit-recognizer.csv
    python predict.py --checkpoint a.pt b.pt --tta     # an ensemble of two, test-time augmentation
    python predict.py --image my_digit.png photo.jpg   # your own images
    python predict.py --min-confidence 0.9             # also list the rows it is unsure of

Writes submissions/submission.csv (ImageId,Label) and, for labelled input, the evaluation report
in outputs/report/: report.html, metrics.json, classification_report.txt and the figures.
Probabilities are calibrated: each checkpoint's logits are divided by the temperature train.py
fitted on its validation split.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import dataset
import export
import images
import model
import onnx_model
import report
from atomic import atomic_write, ensure_writable
from cli import EVAL_BATCH_SIZE, CLIParser, Progress, UserError, run_cli, working_root


@dataclass(frozen=True)
class Options:
    """What one predict.py run does; the defaults are those of `python predict.py`."""

    checkpoint: list[str] = field(
        default_factory=lambda: [str(working_root() / "models" / "best.pt")]
    )
    input: str | None = None
    output: str = field(default_factory=lambda: str(working_root() / "submissions/submission.csv"))
    probabilities: bool = False
    tta: bool = False
    image: list[str] | None = None
    min_confidence: float | None = None
    export: str | None = None
    report_dir: str = field(default_factory=lambda: str(working_root() / "outputs" / "report"))
    no_report: bool = False
    batch_size: int = EVAL_BATCH_SIZE
    device: str | None = None
    precision: str = field(default_factory=model.default_precision)


def parse_args(argv: list[str] | None) -> Options:
    """The command line as Options, checked; a bad flag is a UserError."""
    default = Options()
    p = CLIParser(description="Predict with trained checkpoints; evaluate labelled input.")
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=default.checkpoint,
        help="one or more checkpoints; several average their probabilities (an ensemble)",
    )
    p.add_argument(
        "--input",
        help="CSV to predict (.csv, .csv.gz, .zip[::member]) (default: found, see docs/data.md)",
    )
    p.add_argument("--output", default=default.output, help="submission CSV")
    p.add_argument("--probabilities", action="store_true", help="add columns prob_0..prob_9")
    p.add_argument(
        "--tta",
        action="store_true",
        help=f"test-time augmentation: average over {dataset.TTA_SHIFT}-pixel shifts and "
        f"+-{dataset.TTA_DEGREES:g} degree rotations (the mirror image instead of the rotations "
        "for models trained on mirrored images: Fashion-MNIST's)",
    )
    p.add_argument("--image", nargs="+", help="predict these image files instead of a CSV")
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="P",
        help="list the rows whose top probability is under P (0..1) in a review CSV beside the "
        "submission (<output>_review.csv) and a figure, and report accuracy on the rest; the "
        "submission still holds every row",
    )
    p.add_argument(
        "--export",
        metavar="FILE.onnx",
        help="write the checkpoints as one ONNX model (normalization, temperature and the "
        "ensemble average inside, any batch size), checked against PyTorch, instead of predicting",
    )
    p.add_argument("--report-dir", default=default.report_dir, help="evaluation report, figures")
    p.add_argument("--no-report", action="store_true", help="write the submission only")
    p.add_argument(
        "--batch-size", type=int, default=default.batch_size, help="images per forward pass"
    )
    model.add_device_arguments(p, default.device, default.precision)
    options = Options(**vars(p.parse_args(argv)))
    check_options(options)
    return options


def check_options(options: Options) -> None:
    """Refuse flags that cannot go together or cannot work, one line each, before any input
    is read."""
    if options.image and options.input:
        raise UserError("--image and --input: give one of them")
    if Path(options.output).is_dir():
        raise UserError(f"--output {options.output}: is a directory (name a .csv file)")
    if options.batch_size < 1:
        raise UserError(f"--batch-size {options.batch_size}: must be at least 1")
    if options.min_confidence is not None and not 0 <= options.min_confidence <= 1:
        raise UserError(f"--min-confidence {options.min_confidence:g}: must be in 0..1")
    if options.min_confidence is not None and options.image:
        raise UserError("--min-confidence: applies to CSV input, not --image")
    if options.export:
        check_export_flags(options)


def check_export_flags(options: Options) -> None:
    """--export writes a model: a file name ending .onnx, from .pt checkpoints, nothing else."""
    if not onnx_model.is_onnx(options.export):
        raise UserError(f"--export {options.export}: name a .onnx file")
    if any(onnx_model.is_onnx(path) for path in options.checkpoint):
        raise UserError("--export: give .pt checkpoints to export, not an .onnx file")
    for flag in ("input", "image", "tta", "min_confidence", "probabilities"):
        if getattr(options, flag):
            raise UserError(
                f"--export writes the model only; give --{flag.replace('_', '-')} when "
                "predicting with it (--checkpoint model.onnx)"
            )


# ---------------------------------------------------------------- models and inference


@dataclass
class Member:
    """One checkpoint of an ensemble, ready on its device."""

    path: str
    checkpoint: dict
    net: torch.nn.Module
    normalize: dataset.Normalize
    mirror: bool  # trained on mirrored images, so test-time augmentation may mirror too
    temperature: float  # its logits are divided by this (1: a checkpoint never calibrated)


def trained_on_mirror_images(checkpoint: dict) -> bool:
    """Whether a checkpoint's training augmentation mirrored images (Fashion-MNIST's policy)."""
    augmented = checkpoint.get("config", {}).get("augment", False)
    return bool(augmented) and dataset.Augment.for_classes(checkpoint["class_names"]).hflip


class Ensemble:
    """One or more checkpoints on a device, each with its own input normalization; predicts the
    mean of their softmax outputs, optionally over test-time augmented views."""

    def __init__(self, paths: list[str], device: torch.device, precision: model.Precision) -> None:
        self.device, self.precision = device, precision
        self.members = [self._load(path) for path in paths]
        self.class_names = tuple(self.members[0].checkpoint["class_names"])
        for member in self.members[1:]:
            names = member.checkpoint["class_names"]
            if tuple(names) != self.class_names:
                raise UserError(
                    f"{member.path}: its classes ({', '.join(names)}) differ from those of "
                    f"{paths[0]} ({', '.join(self.class_names)}); an ensemble needs one task"
                )

    def _load(self, path: str) -> Member:
        checkpoint = model.load_checkpoint(path)
        net = self.precision.place(
            model.model_from_checkpoint(checkpoint, path).eval(), self.device
        )
        normalize = dataset.Normalize(
            checkpoint["mean"], checkpoint["std"], self.precision.channels_last
        )
        mirror = trained_on_mirror_images(checkpoint)
        return Member(path, checkpoint, net, normalize, mirror, checkpoint.get("temperature", 1.0))

    @property
    def paths(self) -> list[str]:
        return [member.path for member in self.members]

    @property
    def checkpoints(self) -> list[dict]:
        return [member.checkpoint for member in self.members]

    def describe(self) -> str:
        return ", ".join(
            f"{m.path} ({m.checkpoint['arch']}, epoch {m.checkpoint.get('epoch', '?')}, "
            f"temperature {m.temperature:.3g})"
            for m in self.members
        )

    def seen_fingerprint(self) -> dict[str, np.ndarray] | None:
        """The pixel hashes of the rows any member trained on ("train") or validated on
        ("val"); None when a checkpoint predates the fingerprint."""
        if any("seen_rows" not in ckpt for ckpt in self.checkpoints):
            return None
        return {
            split: np.unique(
                np.concatenate([c["seen_rows"][split].numpy() for c in self.checkpoints])
            )
            for split in ("train", "val")
        }

    def seen_in_training(self, images: np.ndarray) -> dict | None:
        return dataset.count_seen(self.seen_fingerprint(), images)

    def stories(self) -> list[dict]:
        return [model_story(member) for member in self.members]

    def numerics(self) -> str:
        return f"{self.device.type} ({self.precision.describe()})"

    def predict_proba(
        self, images: np.ndarray, tta: bool = False, batch_size: int = EVAL_BATCH_SIZE
    ) -> np.ndarray:
        """Calibrated class probabilities [N, classes] (float32) for uint8 images [N, 28, 28]."""
        return self.probabilities(images, tta, batch_size)[0]

    def probabilities(
        self,
        images: np.ndarray,
        tta: bool = False,
        batch_size: int = EVAL_BATCH_SIZE,
        progress: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities [N, classes] (float32) for uint8 images [N, 28, 28], averaged over
        members (and views): calibrated (each member's logits over its temperature) and raw.
        `progress` labels the progress shown (cli.Progress), None shows none."""
        batches = dataset.DeviceBatches(images, None, batch_size, self.device, normalize=None)
        out, seen = [], 0
        with (
            torch.inference_mode(),
            self.precision.autocast(self.device),
            Progress(progress, len(batches)) as shown,
        ):
            for done, (xb, _) in enumerate(batches, 1):
                calibrated, raw, views = 0, 0, 0
                for member in self.members:
                    for view in dataset.tta_views(xb, member.mirror) if tta else [xb]:
                        logits = member.net(member.normalize(view)).float()
                        calibrated = calibrated + (logits / member.temperature).softmax(1)
                        raw = raw + logits.softmax(1)
                        views += 1
                out.append(torch.stack([calibrated, raw]).cpu() / views)
                seen += len(xb)
                shown.step(done, seen)
        both = torch.cat(out, 1).numpy()
        return both[0], both[1]


# How an ONNX export's PyTorch reference runs: fp32, plain memory format (on the CPU).
EXPORT_PRECISION = model.Precision(dtype=None, grad_scaler=False, channels_last=False)


# ---------------------------------------------------------------- submission CSV


def write_submission(path: Path, ids: np.ndarray, probs: np.ndarray, probabilities: bool) -> None:
    """Kaggle's `ImageId,Label` (with `prob_0..` columns when asked), written atomically."""
    labels = probs.argmax(1)
    columns = [ids[:, None].astype(str), labels[:, None].astype(str)]
    header = ["ImageId", "Label"]
    if probabilities:
        columns.append(np.char.mod("%.6f", probs))
        header += [f"prob_{k}" for k in range(probs.shape[1])]
    table = np.concatenate(columns, axis=1)
    buf = io.StringIO()
    buf.write(",".join(header) + "\n")
    np.savetxt(buf, table, fmt="%s", delimiter=",")
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------- your own images


def predict_images(options: Options, ensemble: Ensemble) -> list[dict]:
    """Print each image's predicted class and probability; draw the preprocessed inputs."""
    prepared = np.stack([images.preprocess_image(path) for path in options.image])
    probs = ensemble.predict_proba(prepared, options.tta, options.batch_size)
    names = ensemble.class_names
    results = []
    for path, p in zip(options.image, probs, strict=True):
        first, second = np.argsort(-p)[:2]
        results.append({"image": path, "class": names[first], "probability": float(p[first])})
        print(f"{path}: {names[first]} ({p[first]:.1%}; next {names[second]} {p[second]:.1%})")
    if not options.no_report:
        import plots

        captions = [
            f"{Path(r['image']).name}\n{r['class']} {r['probability']:.0%}" for r in results
        ]
        grid = plots.prediction_grid(
            prepared,
            captions,
            None,
            "Your images after MNIST-style preprocessing, with the prediction",
            Path(options.report_dir) / "own_images.png",
            cols=min(len(prepared), 8),
        )
        print(f"wrote {grid}")
    return results


# ---------------------------------------------------------------- CSV input


def predict_csv(options: Options, ensemble: Ensemble, started: float) -> dict:
    """Write the submission, warn of rows the model learned from, then the report."""
    data = dataset.load_csv(options.input or dataset.find_data("test"))
    names = ensemble.class_names
    if data.layout in dataset.LAYOUTS and tuple(data.class_names) != names:
        print(
            f"note: {data.source} looks like {'/'.join(data.class_names[:3])}/... data but the "
            f"checkpoint's classes are {'/'.join(names[:3])}/...; using the checkpoint's",
            file=sys.stderr,
        )
    probs, raw = ensemble.probabilities(
        data.images, options.tta, options.batch_size, progress="predicting"
    )
    output = Path(options.output)
    write_submission(output, data.ids, probs, options.probabilities)
    print(f"wrote {output}: {len(data):,} rows (ImageId,Label) from {data.source}")
    summary = {
        "submission": str(output),
        "rows": len(data),
        "seconds": round(time.perf_counter() - started, 2),
        "seen_in_training": warn_of_seen_rows(ensemble, data),
    }
    if data.labels is not None:
        summary["accuracy"] = float((probs.argmax(1) == data.labels).mean())
    if options.min_confidence is not None:
        summary["abstained"] = abstain(options, data, probs, ensemble.class_names)
    if not options.no_report:
        return {**summary, **write_report(options, ensemble, data, (probs, raw), summary)}
    if data.labels is not None:
        print(f"accuracy {summary['accuracy']:.2%} on {len(data):,} labelled rows")
    return summary


def review_path(output: str | Path) -> Path:
    """Where --min-confidence lists the rows it is unsure of: beside the submission."""
    output = Path(output)
    return output.with_name(f"{output.stem}_review.csv")


def abstain(options: Options, data: dataset.CSVData, probs: np.ndarray, names) -> dict:
    """--min-confidence: the rows whose top probability is under it, most doubtful first, to the
    review CSV and (with the report) a figure; accuracy on the rows kept. Returns the figures."""
    doubtful = np.flatnonzero(report.abstentions(probs, options.min_confidence))
    doubtful = doubtful[np.argsort(probs[doubtful].max(1), kind="stable")]
    labels = None if data.labels is None else data.labels[doubtful]
    path = review_path(options.output)
    write_review(path, data.ids[doubtful], probs[doubtful], labels, names)
    kept = len(data) - len(doubtful)
    result = {"min_confidence": options.min_confidence, "rows": len(doubtful), "review": str(path)}
    result["coverage"] = kept / len(data)
    line = (
        f"--min-confidence {options.min_confidence:g}: {len(doubtful):,} of {len(data):,} rows "
        f"({len(doubtful) / len(data):.1%}) under it -> {path}"
    )
    if data.labels is not None:
        right = np.delete(probs.argmax(1) == data.labels, doubtful)
        result["accuracy_kept"] = float(right.mean()) if kept else None
        line += f"; accuracy on the other {kept:,}: " + (f"{right.mean():.2%}" if kept else "-")
    print(line)
    if not options.no_report:
        import plots

        figure = Path(options.report_dir) / "review.png"
        plots.review(data.images[doubtful], probs[doubtful], labels, names, figure)
    return result


def write_review(path: Path, ids: np.ndarray, probs: np.ndarray, labels, names) -> None:
    """The review CSV, atomically: ImageId, the top two classes and their probabilities, and
    the label when known."""
    top2 = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    lines = ["ImageId,first,p_first,second,p_second" + ("" if labels is None else ",label")]
    for i, (first, second) in enumerate(top2):
        row = [ids[i], names[first], f"{probs[i, first]:.4f}", names[second]]
        row += [f"{probs[i, second]:.4f}"] + ([] if labels is None else [names[labels[i]]])
        lines.append(",".join(map(str, row)))
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_report(options: Options, ensemble: Ensemble, data, both, summary: dict) -> dict:
    """The evaluation report for labelled input; the predictions figure and metrics.json for
    unlabelled input. `both`: the calibrated and raw probabilities. Returns what to add to the
    summary."""
    import plots

    probs, raw = both
    out_dir = Path(options.report_dir)
    context = {
        "input": data.source,
        "checkpoints": ensemble.paths,
        "models": ensemble.stories(),
        "tta": options.tta,
        "submission": summary["submission"],
        "seen_in_training": summary["seen_in_training"],
        "abstained": summary.get("abstained"),
        "predict_seconds": summary["seconds"],
        "versions": model.library_versions(),
        "footer": f"predict.py on {ensemble.numerics()}, torch {torch.__version__}; "
        f"{ensemble.describe()}",
    }
    names = ensemble.class_names
    if data.labels is None:
        grid = plots.sample_predictions(
            data.images, probs, None, names, data.source, out_dir / "sample_predictions.png"
        )
        report.write_prediction_summary(out_dir, probs, names, context)
        print(f"wrote {grid} and metrics.json beside it (unlabelled input: predictions only)")
        return {}
    metrics = report.compute_metrics(data.labels, probs, names, raw)
    report.print_summary(metrics)
    plots.evaluation_figures(metrics, data.images, data.labels, probs, data.source, out_dir)
    plots.calibration_figures(
        metrics, data.labels, probs, context["models"], options.min_confidence, out_dir
    )
    plots.model_figures(context["models"], out_dir)
    page = report.write_evaluation(out_dir, metrics, context)
    print(f"report: {page} (figures, metrics.json and classification_report.txt beside it)")
    return {"report": str(page)}


def model_story(member: Member) -> dict:
    """What the report tells of one checkpoint: architecture, size, recipe, data, training."""
    ckpt = member.checkpoint
    return {
        "checkpoint": member.path,
        "arch": ckpt["arch"],
        "parameters": sum(p.numel() for p in member.net.parameters()),
        "epoch": ckpt.get("epoch"),
        "metrics": ckpt.get("metrics"),
        "temperature": member.temperature,
        "config": ckpt.get("config"),
        "data": ckpt.get("data"),
        "history": ckpt.get("history"),
        "curves": ckpt.get("curves", ""),
    }


def warn_of_seen_rows(ensemble: Ensemble, data: dataset.CSVData) -> dict | None:
    """The leak guard: one warning line when the input holds images the model learned from (as
    Digit Recognizer's test.csv does for a model trained on oddrationale/mnist-in-csv)."""
    seen = ensemble.seen_in_training(data.images)
    if seen and seen["seen"]:
        print(
            f"warning: {data.source}: {report.describe_seen(seen)}; predictions for them do not "
            "measure accuracy on new digits",
            file=sys.stderr,
        )
    return seen


def load_models(options: Options):
    """The checkpoints on their device (an Ensemble), or an ONNX export on onnxruntime."""
    if any(onnx_model.is_onnx(path) for path in options.checkpoint):
        if len(options.checkpoint) > 1:
            raise UserError("--checkpoint: an ONNX export stands alone (export an ensemble whole)")
        return onnx_model.OnnxEnsemble(options.checkpoint[0])
    return Ensemble(options.checkpoint, *model.setup_device(options.device, options.precision))


def main(argv: list[str] | None = None) -> dict | list[dict]:
    started = time.perf_counter()
    options = parse_args(argv)
    ensure_writable(Path(options.output).parent, "--output")
    if not options.no_report:
        ensure_writable(options.report_dir, "--report-dir")
    if options.export:
        ensemble = Ensemble(options.checkpoint, torch.device("cpu"), EXPORT_PRECISION)
        return export.export(ensemble, Path(options.export))
    ensemble = load_models(options)
    if options.image:
        return predict_images(options, ensemble)
    return predict_csv(options, ensemble, started)


if __name__ == "__main__":
    run_cli(main)
