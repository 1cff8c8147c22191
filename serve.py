"""The web app and HTTP API: draw a digit and see what the model sees and thinks.

    python serve.py                                   # models/best.pt on http://127.0.0.1:8000
    python serve.py --checkpoint model.onnx --port 8080

GET / is one page: a canvas to draw on with mouse, pen or finger; the prediction and the class
probabilities as bars, updated as you draw; the 28x28 input the model sees (the same preparation
as `predict.py --image`); a photo upload and a clear button. POST /predict takes PNG or JPEG
bytes, or a data URL, and answers JSON; GET /health names the model. Bad input gets a 4xx answer
with a one-line JSON error and the server goes on serving.
"""

import base64
import binascii
import io
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import images
import onnx_model
from cli import CLIParser, UserError, first_line, run_cli, working_root

MAX_REQUEST_BYTES = 10_000_000  # a phone photo is 2-6 MB
PAGE = Path(__file__).with_name("serve.html")


@dataclass(frozen=True)
class Options:
    """What one serve.py run serves; the defaults are those of `python serve.py`."""

    checkpoint: str = field(default_factory=lambda: str(working_root() / "models" / "best.pt"))
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    precision: str | None = None  # predict.py's default: $MNIST_PRECISION, else auto


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # as train.py's and predict.py's --precision


def parse_args(argv: list[str] | None) -> Options:
    default = Options()
    p = CLIParser(description="Serve the draw-a-digit page and the prediction API.")
    p.add_argument("--checkpoint", default=default.checkpoint, help="a .pt checkpoint or .onnx")
    p.add_argument("--host", default=default.host, help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=default.port, help="port to listen on")
    p.add_argument(
        "--device", default=default.device, help="where a .pt checkpoint runs: cpu, cuda or mps"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default.precision,
        help="how it computes there (default: $MNIST_PRECISION, else auto: bf16 where native, "
        "else fp32); an .onnx export runs on onnxruntime's CPU in fp32",
    )
    options = Options(**vars(p.parse_args(argv)))
    if not 0 < options.port < 65536:
        raise UserError(f"--port {options.port}: must be in 1..65535")
    return options


def load(checkpoint: str, device: str = "cpu", precision: str | None = None):
    """The model to serve: an ONNX export on onnxruntime, or a checkpoint on `device` in
    `precision`; None when the file does not exist yet (the page then says how to train one).
    Any other problem with the file is a UserError."""
    if not Path(checkpoint).is_file():
        return None
    if onnx_model.is_onnx(checkpoint):
        if device != "cpu" or precision not in (None, "auto", "fp32"):
            raise UserError(
                f"--device {device} --precision {precision}: an ONNX export runs on "
                "onnxruntime's CPU in fp32 (serve the .pt checkpoint for another device)"
            )
        return onnx_model.OnnxEnsemble(checkpoint)  # without importing torch: a start in a second
    import predict

    chosen = {"precision": precision} if precision else {}
    return predict.load_models(predict.Options(checkpoint=[checkpoint], device=device, **chosen))


def decode(body: bytes) -> bytes:
    """The image bytes of a request body: the body itself, or the payload of a data URL."""
    if not body.strip():
        raise UserError("empty request: send PNG or JPEG bytes, or a data URL")
    if body[:5].lower() != b"data:":
        return body
    header, _, payload = body.partition(b",")
    if b";base64" not in header.lower():
        raise UserError("a data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise UserError("the data URL's payload is not valid base64") from None


def answer(models, image: np.ndarray) -> dict:
    """The prediction for one prepared 28x28 image: class, probabilities, runner-up, input."""
    probs = models.predict_proba(image[None])[0]
    names = models.class_names
    first, second = np.argsort(-probs, kind="stable")[:2]
    return {
        "class": names[first],
        "probability": float(probs[first]),
        "runner_up": {"class": names[second], "probability": float(probs[second])},
        "probabilities": {name: float(p) for name, p in zip(names, probs, strict=True)},
        "input": image.tolist(),
    }


def respond(models, body: bytes) -> tuple[int, dict]:
    """The status and JSON of one /predict request body: the prediction, or the error (413 for
    an image too large to read, 400 for anything else wrong with it)."""
    try:
        image = images.preprocess_image(io.BytesIO(decode(body)), name="the image sent")
    except images.ImageTooLarge as e:
        return 413, {"error": str(e)}
    except UserError as e:
        return 400, {"error": str(e)}
    return 200, answer(models, image)


def describe(models, checkpoint: str) -> dict:
    """What /health says of the model."""
    if models is None:
        return {"ready": False, "checkpoint": checkpoint, "error": no_model_text(checkpoint)}
    stories = models.stories()
    return {
        "ready": True,
        "checkpoint": checkpoint,
        "classes": list(models.class_names),
        "models": [
            {k: story.get(k) for k in ("arch", "parameters", "epoch", "temperature")}
            for story in stories
        ],
    }


def no_model_text(checkpoint: str) -> str:
    return (
        f"No trained model at {checkpoint} yet: train one with python train.py, then start "
        "python serve.py again"
    )


class Refused(Exception):
    """A request answered with an HTTP error `status` and this one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request) -> bytes:
    """A request's body, refused (413) past MAX_REQUEST_BYTES or when the client goes away
    before sending all of it (400, and no traceback in the server's log)."""
    from starlette.requests import ClientDisconnect

    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                raise Refused(
                    413, f"request over {MAX_REQUEST_BYTES:,} bytes: send a smaller image"
                )
    except ClientDisconnect:
        raise Refused(400, "the client went away before its request ended") from None
    return bytes(body)


def create_app(checkpoint: str, device: str = "cpu", precision: str | None = None):
    """The FastAPI app serving `checkpoint` (loaded once, now, on `device` in `precision`)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    models = load(checkpoint, device, precision)
    app = FastAPI(title="MNIST CSV pipeline", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    state = describe(models, checkpoint)
    # the state goes into a <script>: "</" escaped so that no path can close it
    page = PAGE.read_text().replace("/*STATE*/null", json.dumps(state).replace("</", "<\\/"))

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error(exc.status_code, message, getattr(exc, "headers", None))  # 405's Allow

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health() -> dict:
        return state

    @app.post("/predict")
    async def predict_image(request: Request):
        if models is None:
            return error(503, no_model_text(checkpoint))
        try:
            status, content = await run_in_threadpool(respond, models, await read_body(request))
        except Refused as e:
            return error(e.status, str(e))
        except Exception as e:  # a fault of this server, not of the request: one line still
            return error(500, f"the server failed on this image: {first_line(e)}")
        return JSONResponse(content, status_code=status)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port`, before anything says it serves there; an address in use
    or not this machine's is a UserError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        reason = getattr(e, "strerror", None) or first_line(e)
        raise UserError(
            f"--host {host} --port {port}: cannot listen there: {reason} (another server on "
            "that port? give another --port)"
        ) from None
    return sock


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    app = create_app(options.checkpoint, options.device, options.precision)
    import uvicorn

    sock = listen(options.host, options.port)
    url = f"http://{options.host}:{options.port}"
    if app.state.models is None:
        print(f"serving on {url}: {no_model_text(options.checkpoint)}", flush=True)
    else:
        print(f"serving {options.checkpoint} on {url}", flush=True)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    run_cli(main)
