"""The evaluation report's numbers and pages: scikit-learn's classification report, the confusion
matrix and the misclassification analysis, the leak guard's count in words, metrics.json, and one
self-contained HTML page that embeds the figures plots.py drew. No figure code."""

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


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names) -> dict:
    """Every number of the report, JSON-ready, from true labels and predicted probabilities."""
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
        "confused_pairs": _confused_pairs(cm, names),
        "most_misclassified": ranked[:WORST_CLASSES],
        "classification_report": classification_report(labels, preds, digits=4, **common),
    }


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
    parts.append(f"<p class=muted>{html.escape(context['footer'])}</p></body></html>")
    return "\n".join(parts)
