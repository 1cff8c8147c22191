"""Every figure of the project: matplotlib with the Agg backend, seaborn for heatmaps.

Each public function draws one figure, writes it atomically as PNG and returns its path; those
named `*_figures` draw a set and return the paths (`caption` and `sample_rows` are helpers).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

import report
from atomic import atomic_write

DPI = 120
INCH_PER_PIXEL = 0.03  # an image pixel in the digit grids: a digit 0.84 inches wide
MISTAKE = "#c0392b"
BAR = "#4c72b0"


def _save(fig, path: Path) -> Path:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _digit_grid(
    images: np.ndarray,
    titles: list[str],
    suptitle: str,
    cols: int = 10,
    marked: np.ndarray | None = None,
):
    """Images in a grid with a title each; `marked` ones get a red title and frame. One mosaic
    on one axes, drawn in a tenth of the time of a subplot per image."""
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    longest = max((len(line) for t in titles for line in t.splitlines()), default=0)
    width = max(34, round(2.4 * longest) + 6)  # a tile, in image pixels
    height = 28 + 6 + 5 * lines  # the image, its margins and its title
    rows = max(1, -(-len(images) // cols))
    fig = plt.figure(figsize=(cols * width * INCH_PER_PIXEL, rows * height * INCH_PER_PIXEL + 0.4))
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    canvas = np.zeros((rows * height, cols * width))
    marked = np.zeros(len(images), bool) if marked is None else marked
    for k, (img, title, bad) in enumerate(zip(images, titles, marked, strict=False)):
        top, left = (k // cols) * height + height - 31, (k % cols) * width + (width - 28) // 2
        canvas[top : top + 28, left : left + 28] = img
        color = MISTAKE if bad else "black"
        ax.text(left + 13.5, top - 1.5, title, ha="center", va="bottom", fontsize=8, color=color)
        if bad:
            frame = (left - 1.5, top - 1.5)
            ax.add_patch(Rectangle(frame, 30, 30, fill=False, edgecolor=MISTAKE, linewidth=2))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.set(xlim=(0, cols * width), ylim=(rows * height, 0))
    ax.axis("off")
    fig.suptitle(suptitle)
    return fig


def sample_rows(
    n_rows: int, labels: np.ndarray | None, per_class: int, unlabelled: int, seed: int = 0
) -> np.ndarray:
    """Random row indices for a grid: `per_class` of each class, or `unlabelled` rows when there
    are no labels."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return rng.choice(n_rows, size=min(unlabelled, n_rows), replace=False)
    picks = [
        rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)
    ]
    return np.concatenate(picks)


def sample_images(data, path: Path, per_class: int = 6, seed: int = 0) -> Path:
    """A grid of random images, `per_class` of each class when labelled."""
    idx = sample_rows(len(data), data.labels, per_class, unlabelled=60, seed=seed)
    if data.labels is None:
        titles = [f"#{i + 1}" for i in idx]
    else:
        idx = idx.reshape(-1, per_class).T.ravel() if len(idx) == 10 * per_class else idx
        titles = [data.class_names[data.labels[i]] for i in idx]
    fig = _digit_grid(data.images[idx], titles, f"Sample images from {Path(data.source).name}")
    return _save(fig, path)


def _class_bars(ax, values: np.ndarray, texts: list[str], class_names, colors) -> None:
    """One bar per class, named on the x axis, each annotated with its text."""
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), class_names, rotation=_tick_rotation(class_names))
    for bar, value, text in zip(bars, values, texts, strict=True):
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.spines[["top", "right"]].set_visible(False)


def class_distribution(data, path: Path) -> Path:
    """Bar chart of class counts with their shares."""
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    fig, ax = plt.subplots(figsize=(8, 4))
    texts = [f"{n:,}\n{n / counts.sum():.1%}" for n in counts]
    _class_bars(ax, counts, texts, data.class_names, BAR)
    ax.set_ylabel("images")
    ax.set_ylim(0, counts.max() * 1.18)
    ax.set_title(f"Class distribution: {len(data):,} images in {Path(data.source).name}")
    return _save(fig, path)


def augmented_digits(data, augment, path: Path, n: int = 8, copies: int = 7, seed: int = 0) -> Path:
    """Each row: one original image, then `copies` random augmentations of it."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data), size=min(n, len(data)), replace=False)
    x = torch.from_numpy(data.images[idx]).float().div(255).unsqueeze(1)
    g = torch.Generator().manual_seed(seed)
    versions = [x] + [augment(x, g) for _ in range(copies)]
    grid = torch.stack(versions, 1).squeeze(2).mul(255).clamp(0, 255).numpy()
    titles = ["original"] + [f"random {j}" for j in range(1, copies + 1)]
    titles += [""] * (len(idx) - 1) * (copies + 1)
    suptitle = f"Training augmentation, drawn anew each epoch: {augment.describe()}"
    fig = _digit_grid(grid.reshape(-1, 28, 28), titles, suptitle, cols=copies + 1)
    return _save(fig, path)


def exploration_figures(data, augment, out_dir: Path) -> list[Path]:
    """Sample images, the class distribution (labelled data) and augmented digits (unless
    `augment` is None: training without augmentation)."""
    written = [sample_images(data, out_dir / "sample_images.png")]
    if data.labels is not None:
        written.append(class_distribution(data, out_dir / "class_distribution.png"))
    if augment is not None:
        written.append(augmented_digits(data, augment, out_dir / "augmented_digits.png"))
    return written


def training_curves(
    history: list[dict], best_epoch: int, path: Path, training_batches: str
) -> Path:
    """Loss and accuracy per epoch, training against validation (and the calibrated validation
    loss, which chose the kept epoch, where every epoch recorded it), the epoch best.pt kept
    marked; `training_batches` says how the training metrics were measured."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("train", "training", "o-"), ("val", "validation", "s-")):
        loss_ax.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=label, ms=3)
        acc_ax.plot(epochs, [100 * h[f"{key}_acc"] for h in history], style, label=label, ms=3)
    judge, judged = "val_loss", "loss"
    if all("val_loss_calibrated" in h for h in history):
        judge, judged = "val_loss_calibrated", "calibrated loss"
        calibrated = [h[judge] for h in history]
        loss_ax.plot(epochs, calibrated, "s--", label="validation, calibrated", ms=3)
    for best in (h for h in history if h["epoch"] == best_epoch):
        for ax, value, text in (
            (loss_ax, best[judge], f"kept: epoch {best_epoch}\n{judged} {best[judge]:.4f}"),
            (acc_ax, 100 * best["val_acc"], f"kept: epoch {best_epoch}\n{best['val_acc']:.2%}"),
        ):
            ax.annotate(
                text,
                (best_epoch, value),
                xytext=(0, 40 if ax is loss_ax else -40),
                textcoords="offset points",
                ha="center",
                arrowprops={"arrowstyle": "->"},
            )
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"Training curves (training metrics: {training_batches})")
    return _save(fig, path)


def _tick_rotation(class_names) -> int:
    return 30 if len(max(class_names, key=len)) > 2 else 0


def confusion_matrices(cm: np.ndarray, class_names, path: Path) -> Path:
    """Two heatmaps side by side: counts, and each true class's row as percentages."""
    import seaborn as sns

    rows = cm.sum(1, keepdims=True)
    share = np.divide(100 * cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(17, 7.5))
    off_diagonal = ~np.eye(len(cm), dtype=bool)
    for ax, values, fmt, title in (
        (axes[0], cm, "d", "counts"),
        (axes[1], share, ".1f", "share of each true class (%)"),
    ):
        labels = {"xticklabels": class_names, "yticklabels": class_names}
        style = {"cmap": "Blues", "cbar": False, "square": True, "annot_kws": {"fontsize": 8}}
        sns.heatmap(values, annot=True, fmt=fmt, ax=ax, **labels, **style)
        for text, off in zip(ax.texts, off_diagonal.ravel(), strict=True):
            if off and text.get_text() not in ("0", "0.0"):
                text.set_color(MISTAKE)
                text.set_fontweight("bold")
        ax.set(xlabel="predicted", ylabel="true", title=title)
        ax.tick_params(axis="x", rotation=_tick_rotation(class_names))
        ax.tick_params(axis="y", rotation=0)
    fig.suptitle(f"Confusion matrix: {cm.sum():,} images, {np.trace(cm) / cm.sum():.2%} correct")
    return _save(fig, path)


def prediction_grid(
    images: np.ndarray,
    captions: list[str],
    wrong: np.ndarray | None,
    title: str,
    path: Path,
    cols: int = 10,
) -> Path:
    """Predicted images with their captions; wrong predictions in red with a red frame."""
    fig = _digit_grid(images, captions, title, cols=cols, marked=wrong)
    return _save(fig, path)


def per_class_errors(
    errors: list[int], support: list[int], class_names, worst: list[str], path: Path
) -> Path:
    """Error rate of each true class, with its error count over its support; the `worst`
    classes (the report's most misclassified) in red."""
    errors, support = np.array(errors), np.array(support)
    rates = np.divide(100 * errors, support, out=np.zeros(len(errors)), where=support > 0)
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = [MISTAKE if name in worst else BAR for name in class_names]
    texts = [f"{r:.1f}%\n{e}/{n}" for r, e, n in zip(rates, errors, support, strict=True)]
    _class_bars(ax, rates, texts, class_names, colors)
    ax.set(xlabel="true class", ylabel="error rate (%)")
    ax.set_ylim(0, max(rates.max(), 0.1) * 1.25)
    ax.set_title("Error rate per class (the three worst in red)")
    return _save(fig, path)


def caption(names, pred: int, conf: float, true: int | None = None) -> str:
    """A predicted image's caption: class and confidence, then the truth when it differs."""
    text = f"{names[pred]} {conf:.0%}"
    return text if true is None or true == pred else f"{text}\ntrue: {names[true]}"


def sample_predictions(images, probs, labels, names, source: str, path: Path) -> Path:
    """Four random images of each class (40 when unlabelled) with the predicted class and its
    confidence; mistakes in red with the truth when labels are known."""
    rows = sample_rows(len(images), labels, per_class=4, unlabelled=40)
    preds, conf = probs.argmax(1), probs.max(1)
    truth = [None] * len(rows) if labels is None else labels[rows]
    captions = [caption(names, preds[i], conf[i], t) for i, t in zip(rows, truth, strict=True)]
    wrong = None if labels is None else preds[rows] != labels[rows]
    how = "predicted (confidence)" + ("" if wrong is None else "; mistakes in red, with the truth")
    title = f"Sample predictions on {Path(source).name}: {how}"
    return prediction_grid(images[rows], captions, wrong, title, path)


def confident_mistakes(images, probs, labels, names, path: Path, limit: int = 30) -> Path | None:
    """The `limit` mistakes the model was most sure of; None (and no file, not even an earlier
    run's) when there are none."""
    preds, conf = probs.argmax(1), probs.max(1)
    mistakes = np.flatnonzero(preds != labels)
    mistakes = mistakes[np.argsort(-conf[mistakes], kind="stable")][:limit]
    if not len(mistakes):
        path.unlink(missing_ok=True)
        return None
    return prediction_grid(
        images[mistakes],
        [caption(names, preds[i], conf[i], labels[i]) for i in mistakes],
        np.ones(len(mistakes), bool),
        f"The {len(mistakes)} most confident mistakes: predicted (confidence), then the truth",
        path,
    )


def evaluation_figures(metrics: dict, images, labels, probs, source: str, out_dir: Path) -> list:
    """The report's figures for labelled input (`metrics` as report.compute_metrics gives it):
    confusion matrix, error rate per class, sample predictions, the most confident mistakes."""
    names = list(metrics["per_class"])
    per_class = metrics["per_class"].values()
    written = [
        confusion_matrices(
            np.array(metrics["confusion_matrix"]), names, out_dir / "confusion_matrix.png"
        ),
        per_class_errors(
            [c["errors"] for c in per_class],
            [c["support"] for c in per_class],
            names,
            metrics["most_misclassified"],
            out_dir / "per_class_errors.png",
        ),
        sample_predictions(
            images, probs, labels, names, source, out_dir / "sample_predictions.png"
        ),
        confident_mistakes(images, probs, labels, names, out_dir / "confident_mistakes.png"),
    ]
    return [path for path in written if path is not None]


def review(images, probs, labels, names, path: Path, limit: int = 60) -> Path | None:
    """The rows --min-confidence set aside, most doubtful first: the top two classes with their
    probabilities, mistakes in red with the truth; None (and no file) when there are none."""
    if not len(images):
        path.unlink(missing_ok=True)
        return None
    top2 = np.argsort(-probs[:limit], axis=1, kind="stable")[:, :2]
    captions = [
        f"{names[a]} {p[a]:.0%}\n{names[b]} {p[b]:.0%}"
        for p, (a, b) in zip(probs, top2, strict=False)
    ]
    wrong = None if labels is None else top2[:, 0] != labels[:limit]
    if wrong is not None:
        captions = [
            f"{c}\ntrue: {names[t]}" if w else c
            for c, w, t in zip(captions, wrong, labels, strict=False)
        ]
    shown = f"the {min(limit, len(images))} most doubtful of " if len(images) > limit else ""
    title = f"Set aside for review ({shown}{len(images):,}): the top two classes"
    return prediction_grid(images[:limit], captions, wrong, title, path)


def reliability(calibration: dict, temperatures: list[float], path: Path) -> Path:
    """The reliability diagram: accuracy against confidence in equal-width bins, before and after
    calibration (`calibration` as report.calibration gives it), with the rows in each bin."""
    fig, (ax, count_ax) = plt.subplots(
        2, 1, figsize=(6.5, 7), height_ratios=(3, 1), sharex=True, layout="constrained"
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfectly calibrated")
    t = ", ".join(f"{x:.3g}" for x in temperatures)
    for key, label, color in (
        ("before", "before (temperature 1)", "#dd8452"),
        ("after", f"after (temperature {t})", BAR),
    ):
        bins = calibration[key]["bins"]
        conf = [b["confidence"] for b in bins]
        ece = calibration[key]["ece"]
        ax.plot(
            conf,
            [b["accuracy"] for b in bins],
            "o-",
            color=color,
            ms=4,
            label=f"{label}: ECE {ece:.2%}",
        )
        count_ax.bar(
            [(b["lower"] + b["upper"]) / 2 for b in bins],
            [b["count"] for b in bins],
            width=1 / report.CALIBRATION_BINS * (0.45 if key == "before" else 0.9),
            color=color,
            alpha=0.7,
        )
    ax.set(
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"Reliability: {report.CALIBRATION_BINS} bins of confidence (top probability)",
    )
    ax.legend(loc="upper left", fontsize=8)
    count_ax.set(xlabel="confidence", ylabel="rows", yscale="log")
    for axis in (ax, count_ax):
        axis.grid(alpha=0.3)
        axis.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def accuracy_coverage(labels, probs, min_confidence: float | None, path: Path) -> Path:
    """Accuracy on the most confident rows against the share of rows kept; the point of
    --min-confidence marked when it was given."""
    coverage, accuracy = report.accuracy_coverage(labels, probs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(100 * coverage, 100 * accuracy, color=BAR)
    if min_confidence is not None:
        kept = int((~report.abstentions(probs, min_confidence)).sum())
        if kept:
            x, y = 100 * coverage[kept - 1], 100 * accuracy[kept - 1]
            ax.plot([x], [y], "o", color=MISTAKE)
            ax.annotate(
                f"--min-confidence {min_confidence:g}\n{x:.1f}% kept, {y:.2f}% right",
                (x, y),
                xytext=(30, -45),
                textcoords="offset points",
                ha="left",
                arrowprops={"arrowstyle": "->"},
            )
    low = 100 * accuracy[-1]
    ax.set(
        xlabel="coverage: rows kept, most confident first (%)",
        ylabel="accuracy on them (%)",
        xlim=(100, max(0, 100 * coverage[0] - 1)),
        ylim=(max(0, low - (100 - low) * 0.5), 100.2),
        title="Accuracy against coverage: abstaining on the least confident rows",
    )
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def calibration_figures(
    metrics: dict, labels, probs, models: list[dict], min_confidence, out_dir: Path
) -> list[Path]:
    """The report's calibration figures: the reliability diagram, accuracy against coverage."""
    temperatures = [m["temperature"] for m in models]
    return [
        reliability(metrics["calibration"], temperatures, out_dir / "reliability.png"),
        accuracy_coverage(labels, probs, min_confidence, out_dir / "accuracy_coverage.png"),
    ]


def model_figures(models: list[dict], out_dir: Path) -> list[Path]:
    """Each checkpoint's training curves from the history it holds (checkpoints from before
    histories were kept draw none): training_curves_1.png and on."""
    return [
        training_curves(m["history"], m["epoch"], out_dir / f"training_curves_{k}.png", m["curves"])
        for k, m in enumerate(models, 1)
        if m["history"]
    ]


def search_figures(study, out_dir: Path) -> list[Path]:
    """Optuna's plots of a tune.py study: the optimization history, and the parameter
    importances once two trials have completed."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    figures = {"optimization_history.png": optuna_plots.plot_optimization_history}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) >= 2:
        figures["param_importances.png"] = optuna_plots.plot_param_importances
    with warnings.catch_warnings():  # Optuna calls its matplotlib plots experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return [_save(plot(study).figure, out_dir / name) for name, plot in figures.items()]
