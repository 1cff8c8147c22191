"""predict.py: the submission, ensembles and TTA, the report of a prediction run, the leak guard,
your own images, and bad input refused with one line, exit code 2 and nothing half-written.
Models train and predict on the CPU in $MNIST_PRECISION's precision; results are compared with
margins that no precision or CPU crosses. The report's numbers: test_report.py."""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEST, SAMPLE_TRAIN, make_table, run_flags
from PIL import Image

import cli
import dataset
import images
import model
import predict
import train
from cli import run_cli

pytestmark = pytest.mark.numerics

PRECISION_NAME = model.default_precision()
PRECISION = model.precision_for(torch.device("cpu"), PRECISION_NAME)


@pytest.fixture(scope="module")
def checkpoints(sample_model, tmp_path_factory) -> list[str]:
    """Two small basic models trained on the bundled sample with different seeds: the shared
    sample model (seed 0) and its seed-1 twin."""
    folder = tmp_path_factory.mktemp("seed1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_CACHE_DIR", str(folder / "cache"))
        flags = ["--train", SAMPLE_TRAIN, "--arch", "basic", "--epochs", "4", "--deterministic"]
        train.main(run_flags(folder, *flags, "--seed", "1"))
    return [sample_model, str(folder / "models" / "best.pt")]


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(folder, *args: str) -> dict:
    """predict.py on the CPU, writing sub.csv and report/ into `folder`."""
    where = ["--output", str(folder / "sub.csv"), "--report-dir", str(folder / "report")]
    return predict.main([*where, "--device", "cpu", *args])


def fp32_probs(checkpoint: str, images: np.ndarray) -> np.ndarray:
    """Probabilities through the standard Dataset path in fp32, independent of predict.py."""
    ckpt = model.load_checkpoint(checkpoint)
    net = model.model_from_checkpoint(ckpt).eval()
    data = dataset.CSVData(images, None, "headerless-unlabelled", "x")
    x = torch.stack(list(dataset.MNISTCSV(data, ckpt["mean"], ckpt["std"])))
    with torch.no_grad():
        return net(x).softmax(1).numpy()


@pytest.fixture(scope="module")
def submitted(checkpoints, tmp_path_factory):
    """One model's submission for the sample's test CSV, without a report."""
    folder = tmp_path_factory.mktemp("submitted")
    summary = run(folder, "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST, "--no-report")
    return summary, read_rows(folder / "sub.csv"), folder


def test_the_submission_is_kaggles_format_in_input_order(submitted):
    _, rows, _ = submitted
    assert list(rows[0]) == ["ImageId", "Label"]
    assert [int(r["ImageId"]) for r in rows] == list(range(1, 1001))


def test_the_submission_holds_the_models_predictions(submitted, checkpoints):
    _, rows, _ = submitted
    labels = np.array([int(r["Label"]) for r in rows])
    reference = fp32_probs(checkpoints[0], dataset.load_csv(SAMPLE_TEST).images).argmax(1)
    assert (labels == reference).mean() > 0.98  # predict.py runs bf16 where the CPU has it


def test_outside_a_terminal_prediction_shows_progress_lines(
    checkpoints, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "PROGRESS_SECONDS", 0.0)  # a line after every batch but the last
    run(tmp_path, "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST, "--no-report",
        "--batch-size", "300")  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if " images/s  " in line]
    # 1,000 rows in batches of 300: four batches, a line after each of the first three
    assert [line.split("  ")[:2] for line in lines] == [
        ["predicting", f"batch {i}/4"] for i in (1, 2, 3)
    ]
    assert all(line.endswith("s left") for line in lines)


def test_labelled_input_is_scored(submitted):
    summary, rows, _ = submitted
    labels = np.array([int(r["Label"]) for r in rows])
    assert summary["accuracy"] == pytest.approx(
        (labels == dataset.load_csv(SAMPLE_TEST).labels).mean()
    )
    assert summary["accuracy"] > 0.8  # observed 95-96% after 4 epochs on 3,600 digits


def test_no_report_writes_the_submission_alone(submitted):
    _, _, folder = submitted
    assert not (folder / "report").exists()


@pytest.fixture(scope="module")
def probabilities(checkpoints, tmp_path_factory) -> dict:
    """The submission with probability columns from each model alone and from both."""
    folder = tmp_path_factory.mktemp("probabilities")
    members = {"a": checkpoints[:1], "b": checkpoints[1:], "ab": checkpoints}
    rows = {}
    for name, ckpts in members.items():
        run(
            folder / name,
            "--checkpoint",
            *ckpts,
            "--input",
            SAMPLE_TEST,
            "--no-report",
            "--probabilities",
        )
        rows[name] = read_rows(folder / name / "sub.csv")
    return rows


def _probs(rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows])


def test_probabilities_add_a_column_per_class(probabilities):
    assert list(probabilities["a"][0]) == ["ImageId", "Label"] + [f"prob_{k}" for k in range(10)]


def test_probabilities_sum_to_one(probabilities):
    np.testing.assert_allclose(_probs(probabilities["a"]).sum(1), 1, atol=1e-4)


def test_the_label_is_the_most_probable_class(probabilities):
    rows = probabilities["ab"]
    np.testing.assert_array_equal(_probs(rows).argmax(1), [int(r["Label"]) for r in rows])


def test_an_ensemble_averages_its_members_probabilities(probabilities):
    a, b, ab = (_probs(probabilities[name]) for name in ("a", "b", "ab"))
    np.testing.assert_allclose(ab, (a + b) / 2, atol=2e-6)
    assert not np.allclose(a, b, atol=1e-3)  # two different models


@pytest.fixture
def dot() -> torch.Tensor:
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 20] = 1
    return x


def test_tta_views_start_with_the_image_itself(dot):
    views = dataset.tta_views(dot)
    assert len(views) == 7
    assert torch.equal(views[0], dot)


def test_tta_views_shift_the_image_a_pixel_four_ways(dot):
    moved = {tuple(torch.nonzero(v[0, 0])[0].tolist()) for v in dataset.tta_views(dot)[1:5]}
    assert moved == {(10, 21), (10, 19), (11, 20), (9, 20)}


def test_tta_for_a_model_trained_on_mirrors_mirrors_instead_of_rotating(dot):
    views = dataset.tta_views(dot, mirror=True)
    assert len(views) == 6
    assert torch.equal(views[5], dot.flip(-1))


@pytest.mark.parametrize("degrees", [8, -8])
def test_tta_rotations_tilt_a_stroke_and_keep_its_ink(degrees):
    bar = torch.zeros(1, 1, 28, 28)
    bar[0, 0, 4:24, 13:15] = 1  # a vertical stroke
    rotated = dataset.rotate(bar, degrees)[0, 0]
    columns = torch.arange(28, dtype=torch.float32)
    top, bottom = (
        (rows.sum(0) * columns).sum() / rows.sum() for rows in (rotated[4:8], rotated[20:24])
    )
    assert abs(top - bottom) > 1.5  # the stroke now leans
    assert rotated.sum() == pytest.approx(bar.sum(), rel=0.05)


@pytest.mark.parametrize(
    ("class_names", "augment", "mirror"),
    [
        (dataset.FASHION_CLASSES, True, True),
        (dataset.FASHION_CLASSES, False, False),  # trained with --no-augment: no mirrors seen
        (dataset.DIGIT_CLASSES, True, False),
    ],
)
def test_tta_mirrors_only_for_a_checkpoint_trained_on_mirror_images(class_names, augment, mirror):
    checkpoint = {"class_names": list(class_names), "config": {"augment": augment}}
    assert predict.trained_on_mirror_images(checkpoint) == mirror


def test_tta_changes_probabilities_but_not_the_quality(tmp_path, checkpoints):
    flags = [
        "--checkpoint",
        checkpoints[0],
        "--input",
        SAMPLE_TEST,
        "--no-report",
        "--probabilities",
    ]
    plain = run(tmp_path / "plain", *flags)
    tta = run(tmp_path / "tta", *flags, "--tta")
    assert (tmp_path / "plain" / "sub.csv").read_text() != (
        tmp_path / "tta" / "sub.csv"
    ).read_text()
    assert tta["accuracy"] > plain["accuracy"] - 0.01


@pytest.fixture(scope="module")
def evaluated(checkpoints, tmp_path_factory):
    """The whole report of one model on the sample's labelled test CSV, and what it printed."""
    folder = tmp_path_factory.mktemp("evaluated")
    summary = run(folder, "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST)
    return summary, folder / "report", folder


def test_the_report_scores_the_submission(evaluated):
    summary, report_dir, folder = evaluated
    metrics = json.loads((report_dir / "metrics.json").read_text())
    labels = np.array([int(r["Label"]) for r in read_rows(folder / "sub.csv")])
    assert metrics["accuracy"] == summary["accuracy"]
    assert metrics["accuracy"] == pytest.approx(
        (labels == dataset.load_csv(SAMPLE_TEST).labels).mean()
    )


def test_the_confusion_matrix_counts_every_row_by_its_truth_and_its_prediction(evaluated):
    _, report_dir, folder = evaluated
    cm = np.array(json.loads((report_dir / "metrics.json").read_text())["confusion_matrix"])
    truth = dataset.load_csv(SAMPLE_TEST).labels
    predicted = np.array([int(r["Label"]) for r in read_rows(folder / "sub.csv")])
    expected = np.zeros((10, 10), dtype=np.int64)
    np.add.at(expected, (truth, predicted), 1)
    np.testing.assert_array_equal(cm, expected)


def test_the_report_names_its_input_and_checkpoints(evaluated, checkpoints):
    _, report_dir, _ = evaluated
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert (metrics["input"], metrics["checkpoints"]) == (SAMPLE_TEST, checkpoints[:1])


def test_the_page_embeds_every_figure_drawn(evaluated):
    _, report_dir, _ = evaluated
    figures = list(report_dir.glob("*.png"))
    assert len(figures) >= 3  # and the mistakes figure, when the model made any
    assert (report_dir / "report.html").read_text().count("data:image/png;base64,") == len(figures)


def test_class_names_come_from_the_checkpoint(tmp_path, checkpoints):
    ckpt = model.load_checkpoint(checkpoints[0])
    fashion = tmp_path / "fashion.pt"
    model.save_checkpoint(fashion, {**ckpt, "class_names": list(dataset.FASHION_CLASSES)})
    run(tmp_path, "--checkpoint", str(fashion), "--input", SAMPLE_TEST)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert list(metrics["per_class"]) == list(dataset.FASHION_CLASSES)
    assert "Ankle boot" in (tmp_path / "report" / "report.html").read_text()


@pytest.fixture(scope="module")
def unlabelled(checkpoints, tmp_path_factory):
    """50 unlabelled rows in Digit Recognizer's test.csv layout, predicted with a report."""
    folder = tmp_path_factory.mktemp("unlabelled")
    header = ",".join(dataset.LAYOUTS["digit-recognizer-test"][0])
    source = folder / "test.csv"
    np.savetxt(
        source, make_table(50, labelled=False), fmt="%d", delimiter=",", header=header, comments=""
    )
    return run(folder, "--checkpoint", checkpoints[0], "--input", str(source)), folder


def test_unlabelled_input_is_predicted_not_scored(unlabelled):
    summary, folder = unlabelled
    assert "accuracy" not in summary
    assert len(read_rows(folder / "sub.csv")) == 50


def test_unlabelled_input_gets_sample_predictions_and_metrics_json_only(unlabelled):
    _, folder = unlabelled
    assert sorted(p.name for p in (folder / "report").iterdir()) == [
        "metrics.json",
        "sample_predictions.png",
    ]


def test_unlabelled_metrics_count_the_predicted_classes(unlabelled):
    _, folder = unlabelled
    metrics = json.loads((folder / "report" / "metrics.json").read_text())
    assert sum(metrics["predicted"].values()) == 50


# ---------------------------------------------------------------- the leak guard


@pytest.fixture(scope="module")
def leaky_csv(tmp_path_factory) -> str:
    """A Digit Recognizer style test.csv: 300 rows the models trained or validated on (the
    sample's first training rows), then 200 they never saw."""
    learned = dataset.load_csv(SAMPLE_TRAIN).images[:300]
    images = np.concatenate([learned, dataset.load_csv(SAMPLE_TEST).images[:200]])
    path = tmp_path_factory.mktemp("leaky") / "test.csv"
    header = ",".join(dataset.LAYOUTS["digit-recognizer-test"][0])
    np.savetxt(path, images.reshape(-1, 784), fmt="%d", delimiter=",", header=header, comments="")
    return str(path)


def _trained_on(checkpoint: str) -> int:
    """How many of the sample's first 300 training rows `checkpoint` trained on (not validated)."""
    fingerprint = model.load_checkpoint(checkpoint)["seen_rows"]["train"].numpy()
    learned = dataset.load_csv(SAMPLE_TRAIN).images[:300]
    return int(np.isin(dataset.row_hashes(learned).view(np.int64), fingerprint).sum())


@pytest.mark.parametrize("members", [1, 2])
def test_the_leak_guard_warns_in_one_line(tmp_path, checkpoints, leaky_csv, capsys, members):
    run(tmp_path, "--checkpoint", *checkpoints[:members], "--input", leaky_csv)
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "learned" in line]
    assert warning.startswith(f"warning: {leaky_csv}: 300 of 500 rows (60.0%) are images")


def test_the_leak_guard_counts_what_one_model_trained_and_validated_on(
    tmp_path, checkpoints, leaky_csv
):
    seen = run(tmp_path, "--checkpoint", checkpoints[0], "--input", leaky_csv)["seen_in_training"]
    trained_on = _trained_on(checkpoints[0])
    assert 200 < trained_on < 300  # the rest were in the model's validation split
    assert seen == {"rows": 500, "seen": 300, "trained_on": trained_on}


def test_an_ensembles_leak_guard_counts_what_any_member_trained_on(
    tmp_path, checkpoints, leaky_csv
):
    seen = run(tmp_path, "--checkpoint", *checkpoints, "--input", leaky_csv)["seen_in_training"]
    assert seen["trained_on"] > max(_trained_on(c) for c in checkpoints)  # splits differ by seed


def test_the_leak_guard_count_goes_into_metrics_json(tmp_path, checkpoints, leaky_csv):
    summary = run(tmp_path, "--checkpoint", checkpoints[0], "--input", leaky_csv)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["seen_in_training"] == summary["seen_in_training"]


@pytest.fixture(scope="module")
def never_seen(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("never-seen")
    return run(folder, "--checkpoint", *checkpoints, "--input", SAMPLE_TEST), folder


def test_the_leak_guard_finds_nothing_in_rows_the_model_never_saw(never_seen):
    summary, _ = never_seen
    assert summary["seen_in_training"] == {"rows": 1000, "seen": 0, "trained_on": 0}


def test_the_report_says_none_were_learned_from_and_warns_of_nothing(never_seen):
    _, folder = never_seen
    page = (folder / "report" / "report.html").read_text()
    assert "0 of 1,000 rows (0.0%) are images" in page
    assert "overstates" not in page


def test_the_leak_guard_prints_nothing_for_rows_never_seen(tmp_path, checkpoints, capsys):
    run(tmp_path, "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST, "--no-report")
    assert "warning" not in capsys.readouterr().err


def test_the_report_warns_when_labelled_input_was_learned_from(tmp_path, checkpoints):
    run(tmp_path, "--checkpoint", checkpoints[0], "--input", SAMPLE_TRAIN)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "4,000 of 4,000 rows (100.0%) are images the model learned from" in page
    assert "the accuracy overstates" in page


# ---------------------------------------------------------------- calibration and abstaining


def test_a_checkpoints_temperature_divides_its_logits(tmp_path, checkpoints):
    ckpt = model.load_checkpoint(checkpoints[0])
    images = dataset.load_csv(SAMPLE_TEST).images[:200]
    probs = {}
    for t in (1.0, 2.0):
        model.save_checkpoint(tmp_path / f"t{t}.pt", {**ckpt, "temperature": t})
        ensemble = predict.Ensemble([str(tmp_path / f"t{t}.pt")], torch.device("cpu"), PRECISION)
        probs[t] = ensemble.predict_proba(images)
    softened = np.sqrt(probs[1.0]) / np.sqrt(probs[1.0]).sum(1, keepdims=True)
    np.testing.assert_allclose(probs[2.0], softened, atol=1e-4)  # softmax(z / 2) ~ sqrt(p)


def test_training_stores_a_temperature_that_sharpens_label_smoothed_probabilities(checkpoints):
    """Label smoothing 0.1 caps a trained model's confidence near 90%; the temperature fitted on
    the validation split undoes that (observed 0.4-0.7)."""
    temperature = model.load_checkpoint(checkpoints[0])["temperature"]
    assert 0.05 < temperature < 1


@pytest.fixture(scope="module")
def abstained(checkpoints, tmp_path_factory):
    """The sample's test CSV predicted with --min-confidence at its median confidence."""
    folder = tmp_path_factory.mktemp("abstained")
    test = dataset.load_csv(SAMPLE_TEST)
    ensemble = predict.Ensemble(checkpoints[:1], torch.device("cpu"), PRECISION)
    probs = ensemble.predict_proba(test.images)
    threshold = float(np.median(probs.max(1)))
    flags = ["--checkpoint", checkpoints[0], "--input", SAMPLE_TEST, "--precision", PRECISION_NAME]
    summary = run(folder, *flags, "--min-confidence", str(threshold))
    return summary, folder, probs, threshold


def test_abstained_rows_are_exactly_those_under_the_threshold(abstained):
    summary, folder, probs, threshold = abstained
    review = read_rows(folder / "sub_review.csv")
    expected = np.flatnonzero(probs.max(1) < threshold) + 1  # ImageId counts from 1
    assert sorted(int(r["ImageId"]) for r in review) == expected.tolist()
    assert summary["abstained"]["rows"] == len(expected)


def test_the_review_file_lists_the_top_two_classes_most_doubtful_first(abstained):
    _, folder, probs, _ = abstained
    review = read_rows(folder / "sub_review.csv")
    assert list(review[0]) == ["ImageId", "first", "p_first", "second", "p_second", "label"]
    first = [float(r["p_first"]) for r in review]
    assert first == sorted(first)
    row = review[0]
    ranked = np.argsort(-probs[int(row["ImageId"]) - 1])
    assert (row["first"], row["second"]) == (str(ranked[0]), str(ranked[1]))


def test_abstaining_keeps_every_row_in_the_submission(abstained):
    _, folder, _, _ = abstained
    assert len(read_rows(folder / "sub.csv")) == 1000


def test_accuracy_on_the_rows_kept_is_reported(abstained):
    summary, folder, probs, threshold = abstained
    labels = dataset.load_csv(SAMPLE_TEST).labels
    kept = probs.max(1) >= threshold
    expected = (probs.argmax(1) == labels)[kept].mean()
    assert summary["abstained"]["accuracy_kept"] == pytest.approx(expected)
    assert summary["abstained"]["coverage"] == pytest.approx(kept.mean())
    assert (folder / "report" / "review.png").is_file()


def test_the_report_holds_calibration_before_and_after(evaluated):
    _, report_dir, _ = evaluated
    fit = json.loads((report_dir / "metrics.json").read_text())["calibration"]
    assert fit["before"]["mean_confidence"] < fit["after"]["mean_confidence"]
    assert fit["after"]["log_loss"] < fit["before"]["log_loss"]
    assert (report_dir / "reliability.png").is_file()


# ---------------------------------------------------------------- your own images


def render(row: np.ndarray, path, top: int, left: int, scale: int = 5) -> None:
    """A real MNIST row as a photo-like file: scaled up, dark ink on white, off-centre."""
    big = np.asarray(Image.fromarray(row).resize((28 * scale, 28 * scale), Image.BICUBIC))
    canvas = np.full((28 * scale + 150, 28 * scale + 110), 255, np.uint8)
    canvas[top : top + 28 * scale, left : left + 28 * scale] = 255 - big
    Image.fromarray(canvas).save(path, quality=90)


def test_rendered_real_digits_get_the_same_prediction_as_their_rows(tmp_path, checkpoints):
    """Rows the model is sure of (top class ahead of the next by 0.5, far from any tie that
    another precision or CPU could tip) keep their class when drawn into photo-like files."""
    test = dataset.load_csv(SAMPLE_TEST)
    ranked = np.sort(fp32_probs(checkpoints[0], test.images), axis=1)
    sure = np.flatnonzero(ranked[:, -1] - ranked[:, -2] > 0.5)
    rng = np.random.default_rng(0)
    rows = rng.choice(sure, 24, replace=False)
    paths = []
    for k, i in enumerate(rows):
        path = tmp_path / f"digit{k}.{'png' if k % 2 else 'jpg'}"
        render(test.images[i], path, top=int(rng.integers(0, 150)), left=int(rng.integers(0, 110)))
        paths.append(str(path))
    results = run(tmp_path, "--checkpoint", checkpoints[0], "--image", *paths)
    expected = fp32_probs(checkpoints[0], test.images[rows]).argmax(1)
    assert [r["class"] for r in results] == [str(c) for c in expected]
    assert (tmp_path / "report" / "own_images.png").is_file()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real digit drawn off-centre as dark ink on light paper, light on dark, and as strokes on
    a transparent canvas; each file prepared by images.preprocess_image."""
    tmp_path = tmp_path_factory.mktemp("prepared")
    row = dataset.load_csv(SAMPLE_TEST).images[3]
    render(row, tmp_path / "dark_on_light.png", top=140, left=3)
    light_on_dark = 255 - np.asarray(Image.open(tmp_path / "dark_on_light.png"))
    Image.fromarray(light_on_dark).save(tmp_path / "light_on_dark.png")
    rgba = np.zeros((*light_on_dark.shape, 4), np.uint8)
    rgba[..., 3] = light_on_dark  # strokes drawn on a transparent canvas
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    return row, {
        name: images.preprocess_image(tmp_path / f"{name}.png")
        for name in ("dark_on_light", "light_on_dark", "transparent")
    }


@pytest.mark.parametrize("variant", ["light_on_dark", "transparent"])
def test_preprocessing_reads_any_ink_the_same_way(prepared, variant):
    _, images = prepared
    np.testing.assert_array_equal(images[variant], images["dark_on_light"])


def test_preprocessing_fits_the_digit_into_20_by_20(prepared):
    _, images = prepared
    ink = images["dark_on_light"]
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20


def test_preprocessing_centres_the_ink_where_mnist_has_it(prepared):
    _, images = prepared
    ink = images["dark_on_light"].astype(float)
    r = np.arange(28)
    centre = ((ink.sum(1) * r).sum() / ink.sum(), (ink.sum(0) * r).sum() / ink.sum())
    np.testing.assert_allclose(centre, 14, atol=0.5)  # MNIST's centre of mass


def test_preprocessing_gives_back_the_digit_it_was_drawn_from(prepared):
    row, images = prepared
    assert np.abs(images["dark_on_light"].astype(int) - row).mean() < 20


# ---------------------------------------------------------------- bad input


class RunsCode:
    """Pickles into a call of os.system: what a malicious checkpoint looks like."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_bad_inputs(folder, checkpoint: str) -> None:
    """Every bad file the table below names, in `folder`."""
    (folder / "corrupt.pt").write_bytes(os.urandom(300))
    torch.save({"format": 1, "payload": RunsCode(folder / "pwned")}, folder / "evil.pt")
    with open(folder / "evil_pickle.pt", "wb") as f:
        pickle.dump({"format": 1, "payload": RunsCode(folder / "pwned")}, f)
    ckpt = model.load_checkpoint(checkpoint)
    model.save_checkpoint(folder / "wrong_arch.pt", {**ckpt, "arch": "strong"})
    model.save_checkpoint(
        folder / "fashion.pt", {**ckpt, "class_names": list(dataset.FASHION_CLASSES)}
    )
    (folder / "ids.csv").write_text("ImageId,Label\n1,7\n2,3\n")
    (folder / "notes.png").write_text("this is not a picture\n")
    Image.fromarray(np.full((50, 40), 255, np.uint8)).save(folder / "blank.png")


GOOD = ["--checkpoint", "{good}"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--checkpoint", "{folder}/none.pt"], "none.pt: no such checkpoint"),
        (["--checkpoint", "{folder}/corrupt.pt"], "corrupt.pt: not a loadable checkpoint"),
        (
            ["--checkpoint", "{folder}/evil.pt"],
            "must not; Trying to load unsupported GLOBAL posix.system",
        ),
        (
            ["--checkpoint", "{folder}/evil_pickle.pt"],
            "holds code or objects a checkpoint must not",
        ),
        (["--checkpoint", "{folder}/wrong_arch.pt"], "wrong_arch.pt: weights do not fit strong"),
        (["--checkpoint", "{good}", "{folder}/fashion.pt"], "an ensemble needs one task"),
        ([*GOOD, "--input", "{folder}/ids.csv"], "ids.csv:1"),
        ([*GOOD, "--input", "{folder}/absent.csv"], "absent.csv: no such file"),
        ([*GOOD, "--image", "{folder}/notes.png"], "notes.png: not a readable image"),
        ([*GOOD, "--image", "{folder}/absent.png"], "absent.png: no such image file"),
        ([*GOOD, "--image", "{folder}/blank.png"], "blank.png: no digit found"),
        ([*GOOD, "--image", "{folder}/blank.png", "--input", SAMPLE_TEST], "give one of them"),
        ([*GOOD, "--input", SAMPLE_TEST, "--output", "{folder}"], "is a directory"),
        ([*GOOD, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        ([*GOOD, "--min-confidence", "1.5"], "--min-confidence 1.5: must be in 0..1"),
        ([*GOOD, "--min-confidence", "-0.1"], "--min-confidence -0.1: must be in 0..1"),
        ([*GOOD, "--image", "{folder}/blank.png", "--min-confidence", "0.5"], "not --image"),
    ],
)
def test_bad_input_gets_one_line_exit_2_and_leaves_the_old_submission(
    tmp_path, checkpoints, capsys, flags, expected
):
    write_bad_inputs(tmp_path, checkpoints[0])
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    old = submissions / "submission.csv"
    old.write_text("ImageId,Label\n1,7\n")
    flags = [flag.format(folder=tmp_path, good=checkpoints[0]) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(predict.main, ["--output", str(old), "--device", "cpu", *flags])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ")
    assert expected in line
    assert old.read_text() == "ImageId,Label\n1,7\n"
    assert [p.name for p in submissions.iterdir()] == ["submission.csv"]
    assert not (tmp_path / "pwned").exists()  # a malicious pickle ran nothing
