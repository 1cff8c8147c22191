"""The evaluation report's numbers, figures and pages on predictions made up to hold known
mistakes (or none), so that every fact is checked without a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_table

import dataset
import plots
import report

NAMES = list(dataset.DIGIT_CLASSES)
MISTAKES = {(3, 5): 4, (7, 1): 2, (9, 4): 1}  # (true, predicted): how often


def predictions(mistakes: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """200 images, 20 of each class, their labels and probabilities: 0.9 on the predicted class,
    which is the true one but for `mistakes`."""
    labels = np.repeat(np.arange(10), 20)
    preds = labels.copy()
    for (true, pred), count in mistakes.items():
        preds[np.flatnonzero(labels == true)[:count]] = pred
    probs = np.full((len(labels), 10), 0.1 / 9)
    probs[np.arange(len(labels)), preds] = 0.9
    images = make_table(len(labels), labelled=False).reshape(-1, 28, 28).astype(np.uint8)
    return images, labels, probs


@pytest.fixture(scope="module")
def metrics() -> dict:
    _, labels, probs = predictions(MISTAKES)
    return report.compute_metrics(labels, probs, NAMES)


def test_accuracy_and_errors(metrics):
    assert (metrics["rows"], metrics["errors"]) == (200, 7)
    assert metrics["accuracy"] == pytest.approx(193 / 200)


def test_the_confusion_matrix_counts_each_mistake_in_its_cell(metrics):
    cm = np.array(metrics["confusion_matrix"])
    off_diagonal = {(t, p): int(cm[t, p]) for t in range(10) for p in range(10) if t != p}
    assert {cell: n for cell, n in off_diagonal.items() if n} == MISTAKES


def test_per_class_support_errors_and_error_rate(metrics):
    three = metrics["per_class"]["3"]
    assert (three["support"], three["errors"]) == (20, 4)
    assert three["error_rate"] == pytest.approx(0.2)


def test_per_class_precision_and_recall(metrics):
    five = metrics["per_class"]["5"]  # 20 right, 4 threes taken for fives
    assert five["precision"] == pytest.approx(20 / 24)
    assert five["recall"] == 1.0


def test_confused_pairs_come_most_frequent_first(metrics):
    pairs = [(p["true"], p["predicted"], p["count"]) for p in metrics["confused_pairs"]]
    assert pairs == [("3", "5", 4), ("7", "1", 2), ("9", "4", 1)]


def test_the_most_misclassified_classes_are_ranked_by_error_rate(metrics):
    assert metrics["most_misclassified"] == ["3", "7", "9"]


def test_log_loss_is_the_mean_negative_log_probability_of_the_truth(metrics):
    expected = -(193 * np.log(0.9) + 7 * np.log(0.1 / 9)) / 200
    assert metrics["log_loss"] == pytest.approx(expected)


def test_macro_and_weighted_f1_average_each_class_f1(metrics):
    """F1 of a class is 2 TP / (2 TP + FP + FN); with 20 rows a class, both averages agree."""
    f1 = []
    for c in range(10):
        fn = sum(n for (t, _), n in MISTAKES.items() if t == c)
        fp = sum(n for (_, p), n in MISTAKES.items() if p == c)
        f1.append(2 * (20 - fn) / (2 * (20 - fn) + fp + fn))
    assert metrics["macro_avg"]["f1"] == pytest.approx(np.mean(f1))
    assert metrics["weighted_avg"]["f1"] == pytest.approx(np.mean(f1))
    assert metrics["per_class"]["3"]["f1"] == pytest.approx(f1[3])


def test_the_summary_prints_the_report_and_the_most_confused_pairs(metrics, capsys):
    report.print_summary(metrics)
    out = capsys.readouterr().out
    assert "weighted avg" in out
    assert "most confused (true -> predicted): 3 -> 5 x4, 7 -> 1 x2, 9 -> 4 x1" in out


CONTEXT = {
    "input": "data/test.csv",
    "checkpoints": ["models/best.pt"],
    "tta": False,
    "submission": "submissions/submission.csv",
    "seen_in_training": {"rows": 200, "seen": 0, "trained_on": 0},
    "models": [
        {
            "checkpoint": "models/best.pt",
            "arch": "strong",
            "parameters": 1234567,
            "epoch": 2,
            "metrics": {"val_loss": 0.25, "val_acc": 0.95},
            "temperature": 0.7,
            "config": {"preset": "best", "epochs": 2, "lr": 0.003},
            "data": {"source": "data/train.csv", "train_rows": 900, "val_rows": 100},
            "history": [
                {"epoch": e, "train_loss": 1 / e, "train_acc": 0.9, "val_loss": 0.5 / e}
                | {"val_acc": 0.9 + e / 100}
                for e in (1, 2, 3)
            ],
            "curves": "as in evaluation",
        }
    ],
    "footer": "made up",
}


def write_report(out_dir, mistakes: dict) -> dict:
    """The figures and pages of predictions with these mistakes, into out_dir."""
    images, labels, probs = predictions(mistakes)
    metrics = report.compute_metrics(labels, probs, NAMES, raw=probs**2)
    plots.evaluation_figures(metrics, images, labels, probs, CONTEXT["input"], out_dir)
    plots.calibration_figures(metrics, labels, probs, CONTEXT["models"], 0.5, out_dir)
    plots.model_figures(CONTEXT["models"], out_dir)
    report.write_evaluation(out_dir, metrics, CONTEXT)
    return metrics


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    write_report(out_dir, MISTAKES)
    return out_dir


FIGURES = ["confusion_matrix", "per_class_errors", "sample_predictions", "confident_mistakes"]
FIGURES += ["reliability", "accuracy_coverage", "training_curves_1"]


@pytest.mark.parametrize("figure", FIGURES)
def test_every_figure_is_drawn(written, figure):
    assert (written / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_page_embeds_every_figure(written):
    assert (written / "report.html").read_text().count("data:image/png;base64,") == len(FIGURES)


def test_the_page_tells_the_models_story(written):
    page = (written / "report.html").read_text()
    assert "strong, 1,234,567 parameters" in page
    assert "900 images from data/train.csv (100 more for validation)" in page
    assert "epoch 2: validation loss 0.2500, accuracy 95.00%" in page


def test_the_page_shows_calibration_before_and_after(written):
    page = (written / "report.html").read_text()
    assert "<h2>Calibration</h2>" in page
    assert "expected calibration error (15 bins)" in page


def test_metrics_json_holds_the_numbers_and_the_context(written):
    saved = json.loads((written / "metrics.json").read_text())
    assert (saved["errors"], saved["input"]) == (7, "data/test.csv")


def test_the_classification_report_is_written_as_text(written):
    assert "precision" in (written / "classification_report.txt").read_text()


def test_the_page_marks_the_most_misclassified_classes(written):
    assert (written / "report.html").read_text().count("<tr class=bad>") == 3


def test_without_mistakes_no_mistakes_figure_remains(tmp_path):
    write_report(tmp_path, MISTAKES)
    write_report(tmp_path, {})  # a later, perfect run into the same folder
    assert not (tmp_path / "confident_mistakes.png").exists()
    assert "No mistakes." in (tmp_path / "report.html").read_text()


def test_the_prediction_summary_counts_each_predicted_class(tmp_path):
    _, _, probs = predictions(MISTAKES)
    report.write_prediction_summary(tmp_path, probs, NAMES, CONTEXT)
    predicted = json.loads((tmp_path / "metrics.json").read_text())["predicted"]
    assert (predicted["5"], predicted["3"], sum(predicted.values())) == (24, 16, 200)


@pytest.mark.parametrize(
    ("seen", "words"),
    [
        (None, "unknown: the checkpoint predates the fingerprint of its training rows"),
        (
            {"rows": 500, "seen": 300, "trained_on": 264},
            "300 of 500 rows (60.0%) are images the model learned from (264 trained on, 36 in "
            "its validation split)",
        ),
    ],
)
def test_the_leak_guard_in_words(seen, words):
    assert report.describe_seen(seen) == words


# ---------------------------------------------------------------- calibration


def confident(preds: np.ndarray, confidence: float) -> np.ndarray:
    """Probabilities that give `confidence` to each row's predicted class, the rest evenly."""
    probs = np.full((len(preds), 10), (1 - confidence) / 9)
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def test_expected_calibration_error_weighs_each_bins_gap_by_its_rows():
    labels = np.zeros(20, int)
    preds = np.zeros(20, int)
    preds[[0, 1, 10, 11, 12, 13]] = 1  # 8 of 10 right at 0.9, 6 of 10 right at 0.6
    probs = np.concatenate([confident(preds[:10], 0.9), confident(preds[10:], 0.6)])
    assert report.expected_calibration_error(probs, labels) == pytest.approx(0.1 * 10 / 20)
    bins = report.reliability_bins(probs, labels)
    assert [(b["count"], b["accuracy"]) for b in bins] == [(10, 0.6), (10, 0.8)]


def test_the_brier_score_is_the_squared_distance_to_the_truth():
    probs = np.array([np.eye(10)[3], np.eye(10)[4], np.full(10, 0.1)])
    labels = np.array([3, 3, 3])
    assert report.brier_score(probs[:1], labels[:1]) == 0
    assert report.brier_score(probs[1:2], labels[1:2]) == 2
    assert report.brier_score(probs[2:], labels[2:]) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        ({"augment": True, "augment_strength": 0.5, "ema": 0.0}, ["augment", "augment_strength"]),
        ({"augment": False, "augment_strength": 0.5, "ema": 0.999}, ["augment", "ema"]),
    ],
)
def test_the_model_section_names_the_distortions_strength_only_when_it_distorts(cfg, named):
    assert [key for key in report.RECIPE_KEYS if report._named(key, cfg)] == named


def test_the_temperature_search_finds_a_minimum_evaluating_once_a_step():
    calls = []

    def loss(t: float) -> float:
        calls.append(t)
        return (np.log(t) - np.log(3.0)) ** 2

    assert report._golden_section(loss, steps=60) == pytest.approx(3.0, rel=1e-9)
    assert len(calls) == 62  # the two first inner points, then one a step


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(20_000, 10))
    p = report.softmax(logits, 2.0)
    labels = (p.cumsum(1) < rng.random((len(p), 1))).sum(1)
    assert report.fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("scale", [0.2, 5.0])
def test_the_fitted_temperature_lowers_the_nll_of_an_under_or_overconfident_model(scale):
    _, labels, probs = predictions(MISTAKES)
    logits = np.log(probs) * scale
    t = report.fit_temperature(logits, labels)
    assert report.nll(logits, labels, t) < report.nll(logits, labels, 1.0)


def test_without_mistakes_the_temperature_stops_at_laplaces_estimate_of_accuracy():
    _, labels, probs = predictions({})  # 200 rows, all right
    t = report.fit_temperature(np.log(probs), labels)
    mean_confidence = report.softmax(np.log(probs), t).max(1).mean()
    assert mean_confidence == pytest.approx(201 / 202, abs=1e-6)  # not a temperature near 0


def test_calibration_reports_before_and_after():
    _, labels, probs = predictions(MISTAKES)
    fit = report.calibration(labels, probs, confident(probs.argmax(1), 0.5))
    assert fit["after"]["ece"] == pytest.approx(report.expected_calibration_error(probs, labels))
    assert fit["before"]["mean_confidence"] == pytest.approx(0.5)


def test_accuracy_against_coverage_keeps_the_most_confident_rows_first():
    labels = np.zeros(4, int)
    probs = np.concatenate(
        [confident(np.array([p]), c) for p, c in ((0, 0.7), (1, 0.8), (0, 0.9), (0, 0.6))]
    )
    coverage, accuracy = report.accuracy_coverage(labels, probs)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(accuracy, [1, 0.5, 2 / 3, 0.75])
