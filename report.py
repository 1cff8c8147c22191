"""The evaluation report for labelled predictions: the numbers (scikit-learn's classification
report, confusion matrix, misclassification analysis), the figures, metrics.json, and one
self-contained HTML file that tells the whole story."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from atomic import atomic_write, write_json

TOP_PAIRS = 10
WORST_CLASSES = 3
FIGURES = (
    ("confusion_matrix.png", "Confusion matrix"),
    ("per_class_errors.png", "Error rate per class"),
    ("sample_predictions.png", "Sample predictions"),
    ("confident_mistakes.png", "The most confident mistakes"),
)


def evaluate(labels: np.ndarray, probs: np.ndarray, class_names) -> dict:
    """Every number of the report, JSON-ready, from true labels and predicted probabilities."""
    from sklearn.metrics import classification_report, confusion_matrix

    names = list(class_names)
    classes = list(range(len(names)))
    preds = probs.argmax(1)
    common = dict(labels=classes, target_names=names, zero_division=0)
    table = classification_report(labels, preds, output_dict=True, **common)
    cm = confusion_matrix(labels, preds, labels=classes)
    support = cm.sum(1)
    errors = support - np.diag(cm)
    error_rate = np.divide(errors, support, out=np.zeros(len(names)), where=support > 0)
    per_class = {
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
    off = [(int(cm[t, p]), t, p) for t in classes for p in classes if t != p and cm[t, p]]
    off.sort(key=lambda c: (-c[0], c[1], c[2]))
    pairs = [
        {"true": names[t], "predicted": names[p], "count": n, "share_of_true": n / int(support[t])}
        for n, t, p in off[:TOP_PAIRS]
    ]
    worst = [names[i] for i in np.argsort(-error_rate, kind="stable") if errors[i]][:WORST_CLASSES]
    p_true = probs[np.arange(len(labels)), labels]
    return {
        "rows": len(labels),
        "accuracy": float((preds == labels).mean()),
        "errors": int((preds != labels).sum()),
        "log_loss": float(-np.log(np.clip(p_true, 1e-12, 1)).mean()),
        "macro_avg": _averages(table["macro avg"]),
        "weighted_avg": _averages(table["weighted avg"]),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confused_pairs": pairs,
        "most_misclassified": worst,
        "classification_report": classification_report(labels, preds, digits=4, **common),
    }


def _averages(row: dict) -> dict:
    return {"precision": row["precision"], "recall": row["recall"], "f1": row["f1-score"]}


def print_summary(metrics: dict) -> None:
    """Accuracy, the classification report and the most confused pairs, on stdout."""
    print(
        f"accuracy {metrics['accuracy']:.2%} on {metrics['rows']:,} labelled rows "
        f"({metrics['errors']:,} wrong), log loss {metrics['log_loss']:.4f}"
    )
    print(metrics["classification_report"])
    if metrics["confused_pairs"]:
        print("most confused (true -> predicted): " + ", ".join(
            f"{p['true']} -> {p['predicted']} x{p['count']}" for p in metrics["confused_pairs"][:5]
        ))  # fmt: skip
        print("most misclassified classes: " + ", ".join(
            f"{name} ({metrics['per_class'][name]['error_rate']:.2%})"
            for name in metrics["most_misclassified"]
        ))  # fmt: skip


def caption(names, pred: int, conf: float, true: int | None = None) -> str:
    text = f"{names[pred]} {conf:.0%}"
    return text if true is None or true == pred else f"{text}\ntrue: {names[true]}"


def draw_predictions(images, probs, labels, names, source: str, path: Path) -> Path:
    """The sample predictions grid (mistakes marked when labels are known)."""
    import plots

    rows = plots.sample_rows(len(images), labels, per_class=4, unlabelled=40)
    preds, conf = probs.argmax(1), probs.max(1)
    truth = [None] * len(rows) if labels is None else labels[rows]
    captions = [caption(names, preds[i], conf[i], t) for i, t in zip(rows, truth, strict=True)]
    wrong = None if labels is None else preds[rows] != labels[rows]
    how = "predicted (confidence)" + (
        "; mistakes in red, with the truth" if wrong is not None else ""
    )
    title = f"Sample predictions on {Path(source).name}: {how}"
    return plots.prediction_grid(images[rows], captions, wrong, title, path)


def describe_seen(seen: dict | None) -> str:
    """The leak guard's count in words (`seen` as `predict.Ensemble.seen_in_training` gives it)."""
    if seen is None:
        return "unknown: the checkpoint predates the fingerprint of its training rows"
    return (
        f"{seen['seen']:,} of {seen['rows']:,} rows ({seen['seen'] / seen['rows']:.1%}) are "
        f"images the model learned from ({seen['trained_on']:,} trained on, "
        f"{seen['seen'] - seen['trained_on']:,} in its validation split)"
    )


def write_unlabelled(out_dir: Path, images, probs, names, context: dict) -> Path:
    """For input without labels: the sample predictions figure, and metrics.json with the
    predicted class counts and the leak guard's count. Returns the figure's path."""
    grid = draw_predictions(
        images, probs, None, names, context["input"], out_dir / "sample_predictions.png"
    )
    counts = np.bincount(probs.argmax(1), minlength=len(names)).tolist()
    predicted = dict(zip(names, counts, strict=True))
    write_json(out_dir / "metrics.json", {**context, "rows": len(images), "predicted": predicted})
    return grid


def write(out_dir: Path, metrics: dict, images, labels, probs, context: dict) -> Path:
    """Figures, metrics.json, classification_report.txt and report.html into `out_dir`."""
    import plots

    names = list(metrics["per_class"])
    preds, conf = probs.argmax(1), probs.max(1)
    plots.confusion_matrices(
        np.array(metrics["confusion_matrix"]), names, out_dir / "confusion_matrix.png"
    )
    plots.per_class_errors(
        [c["errors"] for c in metrics["per_class"].values()],
        [c["support"] for c in metrics["per_class"].values()],
        names,
        metrics["most_misclassified"],
        out_dir / "per_class_errors.png",
    )
    draw_predictions(images, probs, labels, names, context["input"],
                     out_dir / "sample_predictions.png")  # fmt: skip
    mistakes = np.flatnonzero(preds != labels)
    mistakes = mistakes[np.argsort(-conf[mistakes], kind="stable")][:30]
    mistakes_png = out_dir / "confident_mistakes.png"
    if len(mistakes):
        plots.prediction_grid(
            images[mistakes],
            [caption(names, preds[i], conf[i], labels[i]) for i in mistakes],
            np.ones(len(mistakes), bool),
            f"The {len(mistakes)} most confident mistakes: predicted (confidence), then the truth",
            mistakes_png,
        )
    else:
        mistakes_png.unlink(missing_ok=True)  # a figure from an earlier run would mislead
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


def render_html(metrics: dict, context: dict, fig_dir: Path) -> str:
    """One page with the figures embedded, so that the file alone tells the whole story."""
    pc = metrics["per_class"]
    worst = set(metrics["most_misclassified"])
    class_rows = [
        [name, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"],
         c["errors"], f"{c['error_rate']:.2%}"]
        for name, c in pc.items()
    ]  # fmt: skip
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        a = metrics[key]
        class_rows.append([label, f"{a['precision']:.4f}", f"{a['recall']:.4f}",
                           f"{a['f1']:.4f}", metrics["rows"], metrics["errors"], ""])  # fmt: skip
    pair_rows = [
        [p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.2%}"]
        for p in metrics["confused_pairs"]
    ]
    summary = [
        ["input", context["input"]],
        ["rows", f"{metrics['rows']:,}"],
        ["checkpoints", ", ".join(context["checkpoints"])],
        ["test-time augmentation", "on" if context["tta"] else "off"],
        ["submission", context.get("submission") or "none"],
        ["leak guard", describe_seen(context["seen_in_training"])],
        ["log loss", f"{metrics['log_loss']:.4f}"],
        ["macro F1", f"{metrics['macro_avg']['f1']:.4f}"],
    ]
    figures = {name: title for name, title in FIGURES if (fig_dir / name).is_file()}
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>Evaluation: "
        f"{html.escape(Path(context['input']).name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Evaluation of {html.escape(Path(context['input']).name)}</h1>",
        f"<p><span class=big>{metrics['accuracy']:.2%}</span> accuracy: "
        f"{metrics['rows'] - metrics['errors']:,} of {metrics['rows']:,} right, "
        f"{metrics['errors']:,} wrong.</p>",
        _seen_warning(context["seen_in_training"]),
        _table(None, summary),
    ]
    if "confusion_matrix.png" in figures:
        parts += ["<h2>Confusion matrix</h2>", _figure(fig_dir / "confusion_matrix.png", "")]
    parts += [
        "<h2>Per class</h2>",
        "<p class=muted>scikit-learn's classification report; the most misclassified classes "
        "in red.</p>",
        _table(
            ["class", "precision", "recall", "F1", "support", "errors", "error rate"],
            class_rows,
            {i for i, name in enumerate(pc) if name in worst},
        ),
    ]
    if "per_class_errors.png" in figures:
        parts.append(_figure(fig_dir / "per_class_errors.png", "error rate per class"))
    parts.append("<h2>Most confused pairs</h2>")
    parts.append(
        _table(["true", "predicted", "count", "share of the true class"], pair_rows)
        if pair_rows
        else "<p>No mistakes.</p>"
    )
    for name in ("sample_predictions.png", "confident_mistakes.png"):
        if name in figures:
            parts += [f"<h2>{figures[name]}</h2>", _figure(fig_dir / name, figures[name])]
    parts.append(f"<p class=muted>{html.escape(context['footer'])}</p></body></html>")
    return "\n".join(parts)
