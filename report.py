"""The evaluation report's numbers and pages: scikit-learn's classification report, the confusion
matrix and the misclassification analysis, calibration (the temperature fit, expected calibration
error, Brier score, reliability bins), accuracy against coverage, the leak guard's count in words,
metrics.json, and one self-contained HTML page that embeds the figures plots.py drew. No figure
code."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from atomic import atomic_write, write_json

TOP_PAIRS = 10
WORST_CLASSES = 3
CALIBRATION_BINS = 15
TEMPERATURES = (0.05, 20.0)  # the range fit_temperature searches
COVERAGES = (1.0, 0.99, 0.98, 0.95, 0.9, 0.8)  # accuracy at these shares of rows kept
FIGURES = (
    ("confusion_matrix.png", "Confusion matrix"),
    ("per_class_errors.png", "Error rate per class"),
    ("sample_predictions.png", "Sample predictions"),
    ("confident_mistakes.png", "The most confident mistakes"),
)


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names, raw: np.ndarray | None = None
) -> dict:
    """Every number of the report, JSON-ready, from true labels and predicted probabilities
    (calibrated; `raw`: the same before calibration, when they differ)."""
    from sklearn.metrics import classification_report, confusion_matrix

    names = list(class_names)
    classes = list(range(len(names)))
    preds = probs.argmax(1)
    common = dict(labels=classes, target_names=names, zero_division=0)
    table = classification_report(labels, preds, output_dict=True, **common)
    cm = confusion_matrix(labels, preds, labels=classes)
    per_class = _per_class(table, cm, names)
    error_rates = np.array([c["error_rate"] for c in per_class.values()])
    ranked = [names[i] for i in np.argsort(-error_rates, kind="stable") if error_rates[i]]
    return {
        "rows": len(labels),
        "accuracy": float((preds == labels).mean()),
        "errors": int((preds != labels).sum()),
        "log_loss": log_loss(probs, labels),
        "macro_avg": _averages(table["macro avg"]),
        "weighted_avg": _averages(table["weighted avg"]),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confused_pairs": _confused_pairs(cm, names),
        "most_misclassified": ranked[:WORST_CLASSES],
        "classification_report": classification_report(labels, preds, digits=4, **common),
        "calibration": calibration(labels, probs, probs if raw is None else raw),
        "accuracy_at_coverage": accuracy_at_coverages(labels, probs),
    }


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log of the probability given to the true class (clipped at 1e-12)."""
    p_true = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p_true, 1e-12, 1)).mean())


def _per_class(table: dict, cm: np.ndarray, names: list[str]) -> dict:
    """Precision, recall, F1 (scikit-learn's), support, errors and error rate of each class."""
    support = cm.sum(1)
    errors = support - np.diag(cm)
    error_rate = np.divide(errors, support, out=np.zeros(len(names)), where=support > 0)
    return {
        name: {
            "precision": table[name]["precision"],
            "recall": table[name]["recall"],
            "f1": table[name]["f1-score"],
            "support": int(support[i]),
            "errors": int(errors[i]),
            "error_rate": float(error_rate[i]),
        }
        for i, name in enumerate(names)
    }


def _confused_pairs(cm: np.ndarray, names: list[str]) -> list[dict]:
    """The TOP_PAIRS most frequent (true, predicted) mistakes, most frequent first."""
    confusions = [
        (int(cm[true, pred]), true, pred)
        for true in range(len(names))
        for pred in range(len(names))
        if true != pred and cm[true, pred]
    ]
    confusions.sort(key=lambda confusion: (-confusion[0], confusion[1], confusion[2]))
    return [
        {
            "true": names[true],
            "predicted": names[pred],
            "count": count,
            "share_of_true": count / int(cm[true].sum()),
        }
        for count, true, pred in confusions[:TOP_PAIRS]
    ]


def _averages(row: dict) -> dict:
    return {"precision": row["precision"], "recall": row["recall"], "f1": row["f1-score"]}


# ---------------------------------------------------------------- calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (float64) of logits [N, classes] divided by `temperature`."""
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def judging_loss(metrics: dict) -> tuple[str, float] | None:
    """The loss that chose an epoch, named, from its history row: the calibrated validation loss,
    or the plain one for epochs of runs from before the calibrated loss was recorded; None
    without either."""
    for key, name in (
        ("val_loss_calibrated", "calibrated validation loss"),
        ("val_loss", "validation loss"),
    ):
        if key in metrics:
            return name, metrics[key]
    return None


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes at `temperature`."""
    p_true = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p_true, 1e-300, 1)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the NLL of `labels` (Guo et al. 2017), raised where needed
    so that the mean confidence does not exceed the accuracy that Laplace's rule of succession
    estimates, (right + 1) / (rows + 2). Without that floor a validation split with no mistakes
    asks for a temperature near 0 and probabilities of 100% that new writers do not earn."""
    right = int((logits.argmax(1) == labels).sum())
    cap = (right + 1) / (len(labels) + 2)
    best = _golden_section(lambda t: nll(logits, labels, t))
    if softmax(logits, best).max(1).mean() <= cap:
        return best
    return _golden_section(lambda t: abs(softmax(logits, t).max(1).mean() - cap))


def _golden_section(f, steps: int = 60) -> float:
    """The minimum of a unimodal function of the temperature, searched over log T in
    TEMPERATURES: each step keeps one of its two inner points and evaluates `f` once."""
    lo, hi = np.log(TEMPERATURES)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(np.exp(a)), f(np.exp(b))
    for _ in range(steps):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(np.exp(b))
    return float(np.exp((lo + hi) / 2))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> list:
    """Rows binned by confidence (the top probability) into `bins` equal widths of [0, 1]: each
    non-empty bin's range, count, mean confidence and accuracy."""
    conf, right = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return [
        {
            "lower": k / bins,
            "upper": (k + 1) / bins,
            "count": int((which == k).sum()),
            "confidence": float(conf[which == k].mean()),
            "accuracy": float(right[which == k].mean()),
        }
        for k in range(bins)
        if (which == k).any()
    ]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray) -> float:
    """ECE over CALIBRATION_BINS equal-width confidence bins: the mean gap between confidence
    and accuracy, each bin weighted by its share of rows."""
    bins = reliability_bins(probs, labels)
    return sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in bins) / len(labels)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """The multi-class Brier score: the mean over rows of the squared distance between the
    probabilities and the one-hot truth (0 is perfect, 2 the worst)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(1).mean())


def calibration(labels: np.ndarray, probs: np.ndarray, raw: np.ndarray) -> dict:
    """ECE, Brier score, log loss and reliability bins before (`raw`: temperature 1) and after
    calibration (`probs`)."""

    def scores(p: np.ndarray) -> dict:
        return {
            "ece": expected_calibration_error(p, labels),
            "brier": brier_score(p, labels),
            "log_loss": log_loss(p, labels),
            "mean_confidence": float(p.max(1).mean()),
            "bins": reliability_bins(p, labels),
        }

    return {"before": scores(raw), "after": scores(probs)}


def accuracy_coverage(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The accuracy-coverage curve: keeping the k most confident rows, for every k, the share
    of rows kept and the accuracy on them."""
    order = np.argsort(-probs.max(1), kind="stable")
    right = (probs.argmax(1) == labels)[order]
    kept = np.arange(1, len(labels) + 1)
    return kept / len(labels), np.cumsum(right) / kept


def accuracy_at_coverages(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy on the most confident rows at each share of COVERAGES, keyed "0.99" and so on."""
    _, accuracy = accuracy_coverage(labels, probs)
    return {f"{c:g}": float(accuracy[max(1, round(c * len(labels))) - 1]) for c in COVERAGES}


def abstentions(probs: np.ndarray, min_confidence: float) -> np.ndarray:
    """Which rows the model abstains on: its top probability is under `min_confidence`."""
    return probs.max(1) < min_confidence


def print_summary(metrics: dict) -> None:
    """Accuracy, the classification report and the most confused pairs, on stdout."""
    print(
        f"accuracy {metrics['accuracy']:.2%} on {metrics['rows']:,} labelled rows "
        f"({metrics['errors']:,} wrong), log loss {metrics['log_loss']:.4f}"
    )
    print(metrics["classification_report"])
    if not metrics["confused_pairs"]:
        return
    pairs = [f"{p['true']} -> {p['predicted']} x{p['count']}" for p in metrics["confused_pairs"]]
    print("most confused (true -> predicted): " + ", ".join(pairs[:5]))
    worst = [
        f"{name} ({metrics['per_class'][name]['error_rate']:.2%})"
        for name in metrics["most_misclassified"]
    ]
    print("most misclassified classes: " + ", ".join(worst))


def describe_seen(seen: dict | None) -> str:
    """The leak guard's count in words (`seen` as `predict.Ensemble.seen_in_training` gives it)."""
    if seen is None:
        return "unknown: the checkpoint predates the fingerprint of its training rows"
    return (
        f"{seen['seen']:,} of {seen['rows']:,} rows ({seen['seen'] / seen['rows']:.1%}) are "
        f"images the model learned from ({seen['trained_on']:,} trained on, "
        f"{seen['seen'] - seen['trained_on']:,} in its validation split)"
    )


def write_prediction_summary(out_dir: Path, probs: np.ndarray, names, context: dict) -> Path:
    """metrics.json for input without labels: the context, the count of each predicted class and
    the leak guard's count. Returns its path."""
    counts = np.bincount(probs.argmax(1), minlength=len(names)).tolist()
    predicted = dict(zip(names, counts, strict=True))
    path = out_dir / "metrics.json"
    write_json(path, {**context, "rows": len(probs), "predicted": predicted})
    return path


def write_evaluation(out_dir: Path, metrics: dict, context: dict) -> Path:
    """metrics.json, classification_report.txt and report.html (embedding the figures in
    `out_dir`) for labelled input. Returns the page's path."""
    write_json(out_dir / "metrics.json", {**context, **metrics})
    with atomic_write(out_dir / "classification_report.txt", "w") as f:
        f.write(metrics["classification_report"])
    page = out_dir / "report.html"
    with atomic_write(page, "w") as f:
        f.write(render_html(metrics, context, out_dir))
    return page


# ---------------------------------------------------------------- the HTML page

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .8em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa} .bad{color:#c0392b;font-weight:bold}
.big{font-size:2em;font-weight:bold} img{max-width:100%;border:1px solid #eee} .muted{color:#777}
"""


def _table(header: list[str] | None, rows: list[list], bad_rows: set[int] = frozenset()) -> str:
    head = "" if header is None else "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=bad' if i in bad_rows else ''}>"
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table>{head and f'<tr>{head}</tr>'}{body}</table>"


def _figure(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _seen_warning(seen: dict | None) -> str:
    if not seen or not seen["seen"]:
        return ""
    return (
        f"<p class=bad>{html.escape(describe_seen(seen))}: the accuracy overstates how the model "
        "does on new digits.</p>"
    )


def _per_class_table(metrics: dict) -> str:
    """scikit-learn's classification report as a table, the most misclassified classes in red."""

    def scores(of: dict) -> list[str]:
        return [f"{of[key]:.4f}" for key in ("precision", "recall", "f1")]

    per_class = metrics["per_class"]
    rows = [
        [name, *scores(row), row["support"], row["errors"], f"{row['error_rate']:.2%}"]
        for name, row in per_class.items()
    ]
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        rows.append([label, *scores(metrics[key]), metrics["rows"], metrics["errors"], ""])
    worst = {i for i, name in enumerate(per_class) if name in metrics["most_misclassified"]}
    header = ["class", "precision", "recall", "F1", "support", "errors", "error rate"]
    return _table(header, rows, worst)


def _summary_table(metrics: dict, context: dict) -> str:
    return _table(
        None,
        [
            ["input", context["input"]],
            ["rows", f"{metrics['rows']:,}"],
            ["checkpoints", ", ".join(context["checkpoints"])],
            ["test-time augmentation", "on" if context["tta"] else "off"],
            ["submission", context.get("submission") or "none"],
            ["leak guard", describe_seen(context["seen_in_training"])],
            ["log loss", f"{metrics['log_loss']:.4f}"],
            ["macro F1", f"{metrics['macro_avg']['f1']:.4f}"],
        ],
    )


def _model_section(models: list[dict], fig_dir: Path) -> list[str]:
    """Each checkpoint's story: architecture and size, recipe, training data, its curves."""
    parts = ["<h2>The model</h2>"]
    for k, m in enumerate(models, 1):
        cfg, data = m.get("config") or {}, m.get("data") or {}
        recipe = ", ".join(
            f"{key.replace('_', ' ')} {cfg[key]}" for key in RECIPE_KEYS if _named(key, cfg)
        )
        trained = "unknown (the checkpoint predates this record)"
        if data:
            trained = (
                f"{data['train_rows']:,} images from {data['source']} "
                f"({data['val_rows']:,} more for validation)"
            )
        best = m.get("metrics") or {}
        kept = f"epoch {m['epoch']}"
        if judged := judging_loss(best):
            kept += f": {judged[0]} {judged[1]:.4f}, accuracy {best['val_acc']:.2%}"
        rows = [
            ["checkpoint", m["checkpoint"]],
            ["architecture", f"{m['arch']}, {m['parameters']:,} parameters"],
            ["recipe", recipe or "unknown"],
            ["trained on", trained],
            ["kept", kept],
            ["temperature", _temperature_text(m["temperature"])],
        ]
        if len(models) > 1:
            parts.append(f"<h3>Member {k}</h3>")
        parts.append(_table(None, rows))
        curves = fig_dir / f"training_curves_{k}.png"
        if m.get("history") and curves.is_file():
            parts.append(_figure(curves, f"training curves of {m['checkpoint']}"))
    return parts


RECIPE_KEYS = ("preset", "epochs", "batch_size", "lr", "optimizer", "scheduler")
RECIPE_KEYS += ("label_smoothing", "augment", "augment_strength", "elastic", "ema", "seed")
OFF_BY_ZERO = ("elastic", "ema")  # named only when on


def _named(key: str, cfg: dict) -> bool:
    """Whether the model section names this setting of a checkpoint's config: one it records,
    but not a distortion that is off, nor the strength of distortions that are not drawn."""
    if cfg.get(key) is None or (key in OFF_BY_ZERO and not cfg[key]):
        return False
    return key != "augment_strength" or bool(cfg.get("augment"))


def _temperature_text(temperature: float) -> str:
    if temperature == 1.0:
        return "1 (not calibrated: the checkpoint predates calibration)"
    return f"{temperature:.3g}, fitted on the validation split: probabilities are logits / T"


def _calibration_section(metrics: dict, fig_dir: Path) -> list[str]:
    """ECE, Brier score, log loss and mean confidence before and after, and the diagram."""
    before, after = metrics["calibration"]["before"], metrics["calibration"]["after"]
    rows = [
        [label, fmt(before[key]), fmt(after[key])]
        for label, key, fmt in (
            (f"expected calibration error ({CALIBRATION_BINS} bins)", "ece", "{:.2%}".format),
            ("Brier score", "brier", "{:.4f}".format),
            ("log loss", "log_loss", "{:.4f}".format),
            ("mean confidence", "mean_confidence", "{:.2%}".format),
        )
    ]
    rows.append(["accuracy", *[f"{metrics['accuracy']:.2%}"] * 2])
    parts = [
        "<h2>Calibration</h2>",
        "<p class=muted>Whether a probability means what it says: of the digits given 90%, "
        "about 90% should be right. Before: the network's softmax; after: its logits divided "
        "by the temperature fitted on its validation split.</p>",
        _table(["", "before", "after"], rows),
    ]
    if (fig_dir / "reliability.png").is_file():
        parts.append(_figure(fig_dir / "reliability.png", "reliability diagram"))
    return parts


def _abstain_section(metrics: dict, abstained: dict | None, fig_dir: Path) -> list[str]:
    """Accuracy against coverage, and what --min-confidence set aside."""
    rows = [[f"{float(c):.0%}", f"{a:.2%}"] for c, a in metrics["accuracy_at_coverage"].items()]
    parts = [
        "<h2>Abstaining when unsure</h2>",
        "<p class=muted>Keep only the most confident rows: the accuracy on them against the "
        "share kept.</p>",
        _table(["rows kept", "accuracy on them"], rows),
    ]
    if (fig_dir / "accuracy_coverage.png").is_file():
        parts.append(_figure(fig_dir / "accuracy_coverage.png", "accuracy against coverage"))
    if abstained:
        kept = abstained.get("accuracy_kept")
        parts.append(
            f"<p>--min-confidence {abstained['min_confidence']:g}: {abstained['rows']:,} rows "
            f"set aside in {html.escape(abstained['review'])}, "
            f"{abstained['coverage']:.2%} kept"
            + ("" if kept is None else f", {kept:.2%} of them right")
            + ". The submission holds every row.</p>"
        )
        if (fig_dir / "review.png").is_file():
            parts.append(_figure(fig_dir / "review.png", "rows set aside for review"))
    return parts


def render_html(metrics: dict, context: dict, fig_dir: Path) -> str:
    """One page with the figures embedded, so that the file alone tells the whole story."""
    name = html.escape(Path(context["input"]).name)
    figures = {file: title for file, title in FIGURES if (fig_dir / file).is_file()}
    pairs = [
        [p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.2%}"]
        for p in metrics["confused_pairs"]
    ]
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>Evaluation: {name}</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Evaluation of {name}</h1>",
        f"<p><span class=big>{metrics['accuracy']:.2%}</span> accuracy: "
        f"{metrics['rows'] - metrics['errors']:,} of {metrics['rows']:,} right, "
        f"{metrics['errors']:,} wrong.</p>",
        _seen_warning(context["seen_in_training"]),
        _summary_table(metrics, context),
    ]
    if "confusion_matrix.png" in figures:
        parts += ["<h2>Confusion matrix</h2>", _figure(fig_dir / "confusion_matrix.png", "")]
    parts += [
        "<h2>Per class</h2>",
        "<p class=muted>scikit-learn's classification report; the most misclassified classes "
        "in red.</p>",
        _per_class_table(metrics),
    ]
    if "per_class_errors.png" in figures:
        parts.append(_figure(fig_dir / "per_class_errors.png", "error rate per class"))
    parts.append("<h2>Most confused pairs</h2>")
    header = ["true", "predicted", "count", "share of the true class"]
    parts.append(_table(header, pairs) if pairs else "<p>No mistakes.</p>")
    for file in ("sample_predictions.png", "confident_mistakes.png"):
        if file in figures:
            parts += [f"<h2>{figures[file]}</h2>", _figure(fig_dir / file, figures[file])]
    parts += _calibration_section(metrics, fig_dir)
    parts += _abstain_section(metrics, context.get("abstained"), fig_dir)
    parts += _model_section(context["models"], fig_dir)
    parts.append(f"<p class=muted>{html.escape(context['footer'])}</p></body></html>")
    return "\n".join(parts)
