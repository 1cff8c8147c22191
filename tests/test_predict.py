"""predict.py: the submission, ensembles and TTA, the evaluation report, the leak guard, your own
images, and bad input refused with one line, exit code 2 and nothing half-written. Models train
and predict on the CPU in $MNIST_PRECISION's precision; results are compared with margins that no
precision or CPU crosses."""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import make_table
from PIL import Image

import dataset
import model as models
import predict
import train

pytestmark = pytest.mark.numerics
SAMPLE_TRAIN = str(dataset.SAMPLE_DIR / "mnist_train.csv.gz")
SAMPLE_TEST = str(dataset.SAMPLE_DIR / "mnist_test.csv.gz")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    """Two small basic models trained on the bundled sample with different seeds."""
    root = tmp_path_factory.mktemp("models")
    paths = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_CACHE_DIR", str(root / "cache"))
        for seed in (0, 1):
            out = root / f"seed{seed}"
            train.main([
                "--train", SAMPLE_TRAIN, "--arch", "basic",
                "--epochs", "4", "--seed", str(seed), "--no-plots", "--quiet", "--device", "cpu",
                "--deterministic",
                "--model-dir", str(out), "--out-dir", str(out),
            ])  # fmt: skip
            paths.append(str(out / "best.pt"))
    return paths


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(tmp_path, *args: str) -> dict:
    return predict.main([
        "--output", str(tmp_path / "sub.csv"), "--report-dir", str(tmp_path / "report"),
        "--device", "cpu", *args,
    ])  # fmt: skip


def fp32_probs(checkpoint: str, images: np.ndarray) -> np.ndarray:
    """Probabilities through the standard Dataset path in fp32, independent of predict.py."""
    ckpt = models.load_checkpoint(checkpoint)
    net = models.model_from_checkpoint(ckpt).eval()
    data = dataset.CSVData(images, None, "headerless-unlabelled", "x")
    x = torch.stack([t for t in dataset.MNISTCSV(data, ckpt["mean"], ckpt["std"])])
    with torch.no_grad():
        return net(x).softmax(1).numpy()


def test_submission_is_kaggles_format_in_input_order(tmp_path, checkpoints):
    summary = run(tmp_path, "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST, "--no-report")
    rows = read_rows(tmp_path / "sub.csv")
    assert list(rows[0]) == ["ImageId", "Label"]
    assert [int(r["ImageId"]) for r in rows] == list(range(1, 1001))
    test = dataset.load_csv(SAMPLE_TEST)
    labels = np.array([int(r["Label"]) for r in rows])
    reference = fp32_probs(checkpoints[0], test.images).argmax(1)
    assert (labels == reference).mean() > 0.98  # predict.py runs bf16 where the CPU has it
    assert summary["accuracy"] == pytest.approx((labels == test.labels).mean())
    assert summary["accuracy"] > 0.8  # observed 95-96% after 4 epochs on 3,600 digits
    assert not (tmp_path / "report").exists()


def test_probabilities_columns_and_an_ensemble_averages_them(tmp_path, checkpoints):
    args = ["--input", SAMPLE_TEST, "--no-report", "--probabilities"]
    probs = []
    for name, ckpts in (("a", checkpoints[:1]), ("b", checkpoints[1:]), ("ab", checkpoints)):
        run(tmp_path / name, "--checkpoint", *ckpts, *args)
        rows = read_rows(tmp_path / name / "sub.csv")
        assert list(rows[0]) == ["ImageId", "Label"] + [f"prob_{k}" for k in range(10)]
        p = np.array([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows])
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-4)
        assert (p.argmax(1) == [int(r["Label"]) for r in rows]).all()
        probs.append(p)
    np.testing.assert_allclose(probs[2], (probs[0] + probs[1]) / 2, atol=2e-6)
    assert not np.allclose(probs[0], probs[1], atol=1e-3)


def test_tta_views_are_the_image_its_one_pixel_shifts_and_two_rotations():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 20] = 1
    views = predict.tta_views(x)
    assert len(views) == 7 and torch.equal(views[0], x)
    moved = {tuple(torch.nonzero(v[0, 0])[0].tolist()) for v in views[1:5]}
    assert moved == {(10, 21), (10, 19), (11, 20), (9, 20)}
    mirrored = predict.tta_views(x, mirror=True)  # a model trained on mirrored garments
    assert len(mirrored) == 6 and torch.equal(mirrored[5], x.flip(-1))
    bar = torch.zeros(1, 1, 28, 28)
    bar[0, 0, 4:24, 13:15] = 1  # a vertical stroke
    for rotated in (predict.rotate(bar, 8), predict.rotate(bar, -8)):
        assert rotated.sum() == pytest.approx(bar.sum(), rel=0.05)
        top, bottom = rotated[0, 0, 4:8], rotated[0, 0, 20:24]
        centre_of = lambda rows: (rows.sum(0) * torch.arange(28)).sum() / rows.sum()  # noqa: E731
        assert abs(centre_of(top) - centre_of(bottom)) > 1.5  # the stroke now leans


def test_tta_changes_probabilities_but_not_the_quality(tmp_path, checkpoints):
    plain = run(tmp_path / "plain", "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST,
                "--no-report", "--probabilities")  # fmt: skip
    tta = run(tmp_path / "tta", "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST,
              "--no-report", "--probabilities", "--tta")  # fmt: skip
    a = (tmp_path / "plain" / "sub.csv").read_text()
    assert a != (tmp_path / "tta" / "sub.csv").read_text()
    assert tta["accuracy"] > plain["accuracy"] - 0.01


def test_labelled_input_gets_the_whole_report(tmp_path, checkpoints, capsys):
    summary = run(tmp_path, "--checkpoint", checkpoints[0], "--input", SAMPLE_TEST)
    report_dir = tmp_path / "report"
    metrics = json.loads((report_dir / "metrics.json").read_text())
    test = dataset.load_csv(SAMPLE_TEST)
    labels = np.array([int(r["Label"]) for r in read_rows(tmp_path / "sub.csv")])
    assert metrics["accuracy"] == pytest.approx((labels == test.labels).mean())
    assert metrics["accuracy"] == summary["accuracy"]
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == 1000 and np.trace(cm) == round(1000 * metrics["accuracy"])
    assert (cm.sum(1) == np.bincount(test.labels, minlength=10)).all()
    assert [c["support"] for c in metrics["per_class"].values()] == cm.sum(1).tolist()
    counts = [p["count"] for p in metrics["confused_pairs"]]
    assert counts == sorted(counts, reverse=True) and counts[0] == (cm - np.diag(np.diag(cm))).max()
    first = metrics["confused_pairs"][0]
    assert cm[int(first["true"]), int(first["predicted"])] == first["count"]
    worst = max(metrics["per_class"], key=lambda k: metrics["per_class"][k]["error_rate"])
    assert metrics["most_misclassified"][0] == worst
    assert 0 < metrics["macro_avg"]["f1"] <= 1 and metrics["input"] == SAMPLE_TEST
    for name in (
        "confusion_matrix",
        "per_class_errors",
        "sample_predictions",
        "confident_mistakes",
    ):
        assert (report_dir / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    page = (report_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # the figures live inside the page
    assert "precision" in (report_dir / "classification_report.txt").read_text()
    out = capsys.readouterr().out
    assert "weighted avg" in out and "most confused" in out


def test_class_names_come_from_the_checkpoint(tmp_path, checkpoints):
    ckpt = models.load_checkpoint(checkpoints[0])
    fashion = tmp_path / "fashion.pt"
    models.save_checkpoint(fashion, {**ckpt, "class_names": list(dataset.FASHION_CLASSES)})
    run(tmp_path, "--checkpoint", str(fashion), "--input", SAMPLE_TEST)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert list(metrics["per_class"]) == list(dataset.FASHION_CLASSES)
    assert "Ankle boot" in (tmp_path / "report" / "report.html").read_text()


def test_unlabelled_input_is_only_predicted(tmp_path, checkpoints, write_csv):
    table = make_table(50, labelled=False)
    source = write_csv("test.csv", table, "digit-recognizer-test")
    summary = run(tmp_path, "--checkpoint", checkpoints[0], "--input", str(source))
    assert "accuracy" not in summary
    assert len(read_rows(tmp_path / "sub.csv")) == 50
    assert (tmp_path / "report" / "sample_predictions.png").is_file()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert "accuracy" not in metrics and sum(metrics["predicted"].values()) == 50
    assert not (tmp_path / "report" / "report.html").exists()


# ---------------------------------------------------------------- the leak guard


def test_the_leak_guard_reports_rows_the_model_learned_from(
    tmp_path, checkpoints, write_csv, capsys
):
    """A Digit Recognizer style test.csv holding 300 rows the models trained or validated on and
    200 they never saw, predicted by one model and by an ensemble of two."""
    learned = dataset.load_csv(SAMPLE_TRAIN).images[:300]
    images = np.concatenate([learned, dataset.load_csv(SAMPLE_TEST).images[:200]])
    source = write_csv("test.csv", images.reshape(-1, 784), "digit-recognizer-test")
    fingerprint = models.load_checkpoint(checkpoints[0])["seen_rows"]["train"].numpy()
    trained_on = int(np.isin(dataset.row_hashes(learned).view(np.int64), fingerprint).sum())
    assert 200 < trained_on < 300  # the rest were in the model's validation split
    for members in (checkpoints[:1], checkpoints):
        summary = run(tmp_path, "--checkpoint", *members, "--input", str(source))
        warnings = [line for line in capsys.readouterr().err.splitlines() if "learned" in line]
        assert len(warnings) == 1 and f"{source}: 300 of 500 rows (60.0%)" in warnings[0]
        seen = summary["seen_in_training"]
        assert seen["rows"] == 500 and seen["seen"] == 300
        assert seen["trained_on"] == trained_on if len(members) == 1 else seen["trained_on"] > 270
        metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
        assert metrics["seen_in_training"] == seen and sum(metrics["predicted"].values()) == 500


def test_the_leak_guard_finds_nothing_in_rows_the_model_never_saw(tmp_path, checkpoints, capsys):
    summary = run(tmp_path, "--checkpoint", *checkpoints, "--input", SAMPLE_TEST)
    assert summary["seen_in_training"] == {"rows": 1000, "seen": 0, "trained_on": 0}
    assert "warning" not in capsys.readouterr().err
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["seen_in_training"]["seen"] == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "0 of 1,000 rows (0.0%) are images" in page and "overstates" not in page


def test_the_report_warns_when_labelled_input_was_learned_from(tmp_path, checkpoints):
    run(tmp_path, "--checkpoint", checkpoints[0], "--input", SAMPLE_TRAIN)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "4,000 of 4,000 rows (100.0%) are images the model learned from" in page
    assert "the accuracy overstates" in page


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


def test_preprocessing_matches_mnist_conventions(tmp_path):
    row = dataset.load_csv(SAMPLE_TEST).images[3]
    render(row, tmp_path / "dark_on_light.png", top=140, left=3)
    light_on_dark = 255 - np.asarray(Image.open(tmp_path / "dark_on_light.png"))
    Image.fromarray(light_on_dark).save(tmp_path / "light_on_dark.png")
    rgba = np.zeros((*light_on_dark.shape, 4), np.uint8)
    rgba[..., 3] = light_on_dark  # strokes drawn on a transparent canvas
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    a, b, c = (predict.preprocess_image(tmp_path / f"{n}.png")
               for n in ("dark_on_light", "light_on_dark", "transparent"))  # fmt: skip
    assert np.array_equal(a, b) and np.array_equal(a, c)
    ink = a.astype(float)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20  # fitted into 20x20
    r = np.arange(28)
    centre = ((ink.sum(1) * r).sum() / ink.sum(), (ink.sum(0) * r).sum() / ink.sum())
    assert np.allclose(centre, 14, atol=0.5)  # MNIST's centre of mass
    assert np.abs(a.astype(int) - row).mean() < 20  # the same digit, near where MNIST puts it


# ---------------------------------------------------------------- bad input


class RunsCode:
    """Pickles into a call of os.system: what a malicious checkpoint looks like."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_inputs(tmp_path, checkpoints, write_csv) -> list[tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(300))
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": RunsCode(tmp_path / "pwned")}, evil)
    evil_pickle = tmp_path / "evil_pickle.pt"
    with open(evil_pickle, "wb") as f:
        pickle.dump({"format": 1, "payload": RunsCode(tmp_path / "pwned")}, f)
    ckpt = models.load_checkpoint(checkpoints[0])
    wrong_arch = tmp_path / "wrong_arch.pt"
    models.save_checkpoint(wrong_arch, {**ckpt, "arch": "strong"})
    fashion = tmp_path / "fashion.pt"
    models.save_checkpoint(fashion, {**ckpt, "class_names": list(dataset.FASHION_CLASSES)})
    no_pixels = tmp_path / "ids.csv"
    no_pixels.write_text("ImageId,Label\n1,7\n2,3\n")
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture\n")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((50, 40), 255, np.uint8)).save(blank)
    good = ["--checkpoint", checkpoints[0]]
    return [
        (["--checkpoint", str(tmp_path / "none.pt")], "none.pt: no such checkpoint"),
        (["--checkpoint", str(corrupt)], "corrupt.pt: not a loadable checkpoint"),
        (["--checkpoint", str(evil)], "must not; Trying to load unsupported GLOBAL posix.system"),
        (["--checkpoint", str(evil_pickle)], "holds code or objects a checkpoint must not"),
        (["--checkpoint", str(wrong_arch)], "wrong_arch.pt: weights do not fit strong"),
        (["--checkpoint", checkpoints[0], str(fashion)], "an ensemble needs one task"),
        ([*good, "--input", str(no_pixels)], "ids.csv:1"),
        ([*good, "--input", str(tmp_path / "absent.csv")], "absent.csv"),
        ([*good, "--image", str(not_image)], "notes.png: not a readable image"),
        ([*good, "--image", str(tmp_path / "absent.png")], "absent.png: no such image file"),
        ([*good, "--image", str(blank)], "blank.png: no digit found"),
        ([*good, "--image", str(blank), "--input", SAMPLE_TEST], "give one of them"),
        ([*good, "--input", SAMPLE_TEST, "--output", str(tmp_path)], "is a directory"),
        ([*good, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ]


def test_bad_input_gets_one_line_exit_2_and_leaves_the_old_submission(
    tmp_path, checkpoints, write_csv, capsys
):
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    old = submissions / "submission.csv"
    old.write_text("ImageId,Label\n1,7\n")
    for extra, expected in bad_inputs(tmp_path, checkpoints, write_csv):
        with pytest.raises(SystemExit) as exit_info:
            dataset.run_cli(predict.main, ["--output", str(old), *extra])
        assert exit_info.value.code == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err, (extra, err)
        assert old.read_text() == "ImageId,Label\n1,7\n", extra
        assert [p.name for p in submissions.iterdir()] == ["submission.csv"], extra
    assert not (tmp_path / "pwned").exists()  # the malicious pickle ran nothing
