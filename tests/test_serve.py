"""serve.py: the API answers a real digit sent as PNG bytes or as a data URL with the class that
`predict.py --image` gives, refuses every bad request with a 4xx one-line JSON error and goes on
serving, and the page and /health say which model runs, or that none is trained yet."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import dataset
import images
import predict
import serve
from cli import UserError

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def checkpoint(sample_model) -> str:
    return sample_model


@pytest.fixture(scope="module")
def client(checkpoint) -> TestClient:
    return TestClient(serve.create_app(checkpoint))


def encoded(array: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> str:
    """A real test digit as a drawing would send it: dark ink on white, five times the size."""
    row = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_test.csv.gz").images[7]
    big = np.asarray(Image.fromarray(row).resize((140, 140), Image.Resampling.BICUBIC))
    path = tmp_path_factory.mktemp("drawn") / "digit.png"
    path.write_bytes(encoded(255 - big))
    return str(path)


def test_a_digit_gets_the_class_predict_image_gives(client, checkpoint, drawn):
    expected = predict.main(["--checkpoint", checkpoint, "--image", drawn, "--no-report"])[0]
    response = client.post("/predict", content=Path(drawn).read_bytes())
    assert response.status_code == 200
    assert response.json()["class"] == expected["class"]


def test_a_data_url_is_the_same_request(client, drawn):
    data = Path(drawn).read_bytes()
    expected = client.post("/predict", content=data).json()
    for scheme in (b"data:image/png;base64,", b"DATA:IMAGE/PNG;BASE64,"):  # any letter case
        url = scheme + base64.b64encode(data)
        assert client.post("/predict", content=url).json() == expected


def test_the_answer_holds_the_probabilities_the_runner_up_and_the_input(client, drawn):
    answer = client.post("/predict", content=Path(drawn).read_bytes()).json()
    probs = answer["probabilities"]
    assert list(probs) == list(dataset.DIGIT_CLASSES)
    assert sum(probs.values()) == pytest.approx(1, abs=1e-4)
    assert answer["probability"] == max(probs.values())
    assert answer["runner_up"]["class"] != answer["class"]
    np.testing.assert_array_equal(answer["input"], images.preprocess_image(drawn))


def test_health_names_the_model(client, checkpoint):
    health = client.get("/health").json()
    assert (health["ready"], health["checkpoint"]) == (True, checkpoint)
    assert health["models"][0]["arch"] == "basic"


def test_the_page_carries_the_models_state(client):
    page = client.get("/").text
    assert '<canvas id="pad"' in page
    assert '"ready": true' in page


def bomb() -> bytes:
    """A small PNG file of 60 million pixels."""
    return encoded(np.zeros((6000, 10_000), np.uint8))


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b"", 400, "empty request"),
        (b"   ", 400, "empty request"),
        (b"hello, this is not a picture", 400, "the image sent: not a readable image"),
        (b"data:image/png,abc", 400, "must be base64-encoded"),
        (b"data:image/png;base64,@@@", 400, "not valid base64"),
        (encoded(np.full((40, 40), 255, np.uint8)), 400, "no digit found"),
        (encoded(np.zeros((40, 40), np.uint8), "JPEG")[:60], 400, "not a readable image"),
        (b"x" * (serve.MAX_REQUEST_BYTES + 1), 413, "request over 10,000,000 bytes"),
        ("bomb", 413, "too large to read"),
    ],
)
def test_a_bad_request_gets_a_4xx_line_and_the_next_good_one_is_answered(
    client, drawn, body, status, expected
):
    response = client.post("/predict", content=bomb() if body == "bomb" else body)
    assert response.status_code == status
    message = response.json()["error"]
    assert expected in message and "\n" not in message
    assert client.post("/predict", content=Path(drawn).read_bytes()).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("PUT", "/predict", 405), ("GET", "/openapi.json", 404)],
)
def test_unknown_paths_and_methods_get_the_same_one_line_error(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert response.json()["error"].startswith(f"{method} {path}: ")


def test_head_is_answered_as_get(client):
    for path in ("/", "/health"):
        assert client.head(path).status_code == 200


def test_a_fault_in_the_model_is_a_500_json_line_and_the_server_goes_on(client, drawn, monkeypatch):
    def broken(image):
        raise ValueError("weights gone\nsecond line")

    with monkeypatch.context() as patch:
        patch.setattr(serve, "answer", lambda models, image: broken(image))
        response = client.post("/predict", content=Path(drawn).read_bytes())
    assert response.status_code == 500
    assert response.json() == {"error": "the server failed on this image: weights gone"}
    assert client.post("/predict", content=Path(drawn).read_bytes()).status_code == 200


def test_a_port_in_use_is_one_line_before_anything_says_it_serves(tmp_path, capsys):
    taken = serve.listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    taken.listen()
    try:
        with pytest.raises(UserError, match=f"--port {port}: cannot listen there: .*--port"):
            serve.main(["--checkpoint", str(tmp_path / "best.pt"), "--port", str(port)])
    finally:
        taken.close()
    assert "serving" not in capsys.readouterr().out


def test_the_start_line_says_when_there_is_no_model(tmp_path):
    free = serve.listen("127.0.0.1", 0)
    port = str(free.getsockname()[1])
    free.close()
    script = (
        "import sys, serve, uvicorn; uvicorn.Server.run = lambda self, sockets: None; "
        "serve.main(sys.argv[1:])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "--checkpoint", str(tmp_path / "best.pt"), "--port", port],
        cwd=serve.PAGE.parent,
        capture_output=True,
        text=True,
    )
    assert done.stdout.startswith(f"serving on http://127.0.0.1:{port}: No trained model at ")


def test_without_a_model_the_page_says_how_to_train_one(tmp_path):
    client = TestClient(serve.create_app(str(tmp_path / "best.pt")))
    assert "No trained model at" in client.get("/").text
    assert client.get("/health").json()["ready"] is False
    response = client.post("/predict", content=b"anything")
    assert response.status_code == 503
    assert "python train.py" in response.json()["error"]


class RunsCode:
    def __reduce__(self):
        return os.system, ("true",)


def test_a_checkpoint_holding_code_is_refused_at_start(tmp_path):
    torch.save({"format": 1, "payload": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="holds code or objects a checkpoint must not"):
        serve.create_app(str(tmp_path / "evil.pt"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    predict.main(["--checkpoint", checkpoint, "--export", str(path)])
    return str(path)


def test_an_export_is_served_with_the_checkpoints_answer(client, exported, drawn):
    onnx_client = TestClient(serve.create_app(exported))
    body = Path(drawn).read_bytes()
    got, expected = (c.post("/predict", content=body).json() for c in (onnx_client, client))
    assert got["class"] == expected["class"]
    assert got["probability"] == pytest.approx(expected["probability"], abs=0.02)


def test_an_export_is_served_without_importing_torch(exported):
    check = "import sys, serve; serve.create_app(sys.argv[1]); sys.exit('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", check, exported], cwd=serve.PAGE.parent).returncode
        == 0
    )


def test_an_export_cannot_be_served_on_another_device_or_precision(exported):
    with pytest.raises(UserError, match="an ONNX export runs on onnxruntime's CPU in fp32"):
        serve.create_app(exported, "cuda")
    with pytest.raises(UserError, match="an ONNX export runs on onnxruntime's CPU in fp32"):
        serve.create_app(exported, "cpu", "bf16")


def test_a_checkpoint_is_served_in_the_precision_asked(checkpoint):
    app = serve.create_app(checkpoint, "cpu", "fp32")
    assert "fp32" in app.state.models.numerics()
