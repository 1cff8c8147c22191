"""Architectures (a registry of named builders) with Kaiming init; the device and precision a run
uses (`setup_device`); checkpoints, which are data, never code."""

from __future__ import annotations

import inspect
import io
import math
import os
import platform
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from atomic import write_files
from cli import UserError, class_names_problem, first_line

CHECKPOINT_FORMAT = 1
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Add a builder to ARCHITECTURES under `name`."""

    def add(builder):
        ARCHITECTURES[name] = builder
        return builder

    return add


@register("basic")
def basic(num_classes: int = 10) -> nn.Module:
    """The seed projects' CNN: two 3x3 convs (32, 64), a 128-unit dense layer, dropout 0.5."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )


@register("lenet")
def lenet(num_classes: int = 10) -> nn.Module:
    """The smaller seed variant: 5x5 convs with 10 and 20 filters, a 50-unit dense layer."""
    return nn.Sequential(
        nn.Conv2d(1, 10, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(10, 20, 5),
        nn.Dropout2d(),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(320, 50),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(50, num_classes),
    )


@register("basic_bn")
def basic_bn(num_classes: int = 10) -> nn.Module:
    """`basic` made fast to train: batch norm after each pooling (so BN and ReLU touch a quarter
    of the pixels), a 256-unit dense layer and dropout 0.25. The `--preset fast` network for
    Fashion-MNIST."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(256, num_classes),
    )


@register("small_bn")
def small_bn(
    num_classes: int = 10, *, channels: tuple[int, int] = (24, 32), dropout: float = 0.0
) -> nn.Module:
    """A quarter of `basic_bn`'s parameters at about three times its training speed on a CPU: an
    unpadded 5x5 conv of 24 (24x24 pixels) and a 3x3 conv of 32 (10x10), each pooled, then batch
    norm and ReLU, and a 256-unit dense layer. The `--preset fast` network for digits; other
    `channels` and a `dropout` before the last layer are bench/study_archs.py's variants."""
    a, b = channels
    return nn.Sequential(
        nn.Conv2d(1, a, 5, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(a),
        nn.ReLU(),
        nn.Conv2d(a, b, 3, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(b),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(b * 5 * 5, 256),
        nn.ReLU(),
        *([nn.Dropout(dropout)] if dropout else []),
        nn.Linear(256, num_classes),
    )


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@register("strong")
def strong(num_classes: int = 10, width: int = 32) -> nn.Module:
    """A small VGG-style net: batch-normed 3x3 conv pairs at 28, 14 and 7 pixels, global pooling."""
    w = width
    return nn.Sequential(
        *_conv_bn(1, w),
        *_conv_bn(w, w),
        nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w),
        *_conv_bn(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w),
        *_conv_bn(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * w, num_classes),
    )


@register("wide")
def wide(num_classes: int = 10) -> nn.Module:
    """`strong` with 1.5 times the filters (48, 96, 192): for Fashion-MNIST, at twice the cost."""
    return strong(num_classes, width=48)


def kaiming_init(net: nn.Module) -> nn.Module:
    """Kaiming-normal weights for ReLU nets, zero biases, unit batch-norm scales."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def require_arch(arch: str) -> None:
    """Raise the one-line error for an architecture name that is not registered."""
    if arch not in ARCHITECTURES:
        raise UserError(
            f"--arch {arch}: unknown architecture (choose from {', '.join(ARCHITECTURES)})"
        )


def arch_kwargs(arch: str, num_classes: int, width: int | None = None) -> dict:
    """The builder arguments of `arch` for `num_classes` and, when given, a width, which only
    architectures with a width take (refused in one line for the others)."""
    if width is None:
        return {"num_classes": num_classes}
    if "width" not in inspect.signature(ARCHITECTURES[arch]).parameters:
        having = [
            name for name, b in ARCHITECTURES.items() if "width" in inspect.signature(b).parameters
        ]
        raise UserError(f"--width {width}: {arch} has no width to set ({', '.join(having)} have)")
    return {"num_classes": num_classes, "width": width}


def first_width(arch: str) -> int:
    """The channels of the first convolution of `arch`'s network (strong's --width)."""
    net = build(arch)
    return next(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))


def build(arch: str, **kwargs) -> nn.Module:
    """A freshly initialised network of a registered architecture."""
    require_arch(arch)
    return kaiming_init(ARCHITECTURES[arch](**kwargs))


# ---------------------------------------------------------------- device and precision

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_ENV = "MNIST_PRECISION"  # the default of --precision, for CI and shells that want fp32
PRECISION_HELP = (
    "auto: bf16 on a CPU or GPU that computes it natively, fp16 with loss scaling on older GPUs, "
    f"else fp32 (${PRECISION_ENV} sets the default)"
)


def add_device_arguments(parser, device_default, precision_default) -> None:
    """--device and --precision, as train.py and predict.py take them, on an argparse parser."""
    parser.add_argument(
        "--device", default=device_default, help="cpu, cuda or mps (default: the best available)"
    )
    parser.add_argument(
        "--no-accel",
        dest="device",
        action="store_const",
        const="cpu",
        help="the CPU even where a GPU is (--device cpu)",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=precision_default, help=PRECISION_HELP
    )


def default_precision() -> str:
    """--precision's default: $MNIST_PRECISION when set, else auto."""
    name = os.environ.get(PRECISION_ENV, "auto")
    if name not in PRECISIONS:
        raise UserError(f"${PRECISION_ENV} {name}: not a precision (set one of {PRECISIONS})")
    return name


def cuda_unsupported_reason(index: int = 0) -> str | None:
    """Why this torch build cannot run CUDA device `index` (its compute capability has no kernels
    in `torch.cuda.get_arch_list()`, as a P100 under Kaggle's torch), or None when it can."""
    archs = torch.cuda.get_arch_list()
    if torch.version.cuda is None or not archs:
        return None  # ROCm, or a build that does not say: trust it
    major, minor = torch.cuda.get_device_capability(index)
    for arch in archs:
        code = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if code is None:
            continue
        built = (int(code[2]), int(code[3]))
        if code[1] == "sm" and built[0] == major and built[1] <= minor:
            return None  # binary compatible within a major version
        if code[1] == "compute" and built <= (major, minor):
            return None  # PTX compiles for newer GPUs
    return (
        f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}) is not supported by this "
        f"torch {torch.__version__} build (it has kernels for {' '.join(archs)})"
    )


def setup_device(name: str | None, precision: str = "auto") -> tuple[torch.device, Precision]:
    """The device for --device `name` (None: the best available) and how to run it for
    --precision `precision`; on the CPU, glibc is told to keep freed memory for reuse."""
    device = pick_device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device, precision_for(device, precision)


def pick_device(name: str | None = None) -> torch.device:
    """CUDA (when this torch build has kernels for the GPU), then Apple MPS, then CPU; `name`
    forces one."""
    if name:
        return _forced_device(name)
    if torch.cuda.is_available():
        reason = cuda_unsupported_reason()
        if reason is None:
            return torch.device("cuda")
        print(
            f"note: not using the GPU: {reason}; running on the CPU (on Kaggle, pick the "
            'T4 x2 accelerator: "machine_shape": "NvidiaTeslaT4")',
            file=sys.stderr,
        )
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _forced_device(name: str) -> torch.device:
    """The device --device names, if this machine has it and this torch can run it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: unknown device (choose cpu, cuda, cuda:N or mps)")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available[device.type]:
        raise UserError(f"--device {name}: not available on this machine (try --device cpu)")
    reason = cuda_unsupported_reason(device.index or 0) if device.type == "cuda" else None
    if reason:
        raise UserError(f"--device {name}: {reason} (use --device cpu or another GPU)")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), read at run time. A
    CPU held to AVX2 (ATEN_CPU_CAPABILITY=avx2, as a stand-in for a laptop's CPU) has not."""
    if platform.system() != "Linux":
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False  # no AVX-512 kernels: bf16 would be emulated
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks for reuse instead of unmapping each one. On CPU every batch
    allocates tens of MB of activations, and mapping them afresh costs page faults: measured here,
    inference runs 3x faster with this, training 0-10%. A no-op off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


@contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """Only deterministic algorithms inside the block when `on` (CUDA's cuBLAS also needs its
    workspace setting); the previous setting afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass(frozen=True)
class Precision:
    """How to run a device: autocast dtype (None: fp32), loss scaling, memory format."""

    dtype: torch.dtype | None
    grad_scaler: bool
    channels_last: bool

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def place(self, net: nn.Module, device: torch.device) -> nn.Module:
        """Move a network to `device` in this precision's memory format."""
        net = net.to(device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def describe(self) -> str:
        name = "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return (
            name
            + (" + grad scaler" if self.grad_scaler else "")
            + (", channels_last" if self.channels_last else "")
        )


def precision_for(device: torch.device, name: str = "auto") -> Precision:
    """How to run `device` for --precision `name`. auto: on CUDA bf16 where the GPU computes it
    natively (compute capability 8.0 and newer), else fp16 with a grad scaler (a T4); on CPU bf16
    only with hardware support (measured 1.6-1.9x faster here; emulated, 12x slower), else fp32;
    fp32 on MPS. channels_last on CPU and CUDA (measured faster here)."""
    if name == "auto":
        if device.type == "cuda":
            native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
            name = "bf16" if native_bf16 else "fp16"
        elif device.type == "cpu":
            name = "bf16" if cpu_has_native_bf16() else "fp32"
        else:
            name = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(dtype, grad_scaler=name == "fp16", channels_last=device.type != "mps")


# ---------------------------------------------------------------- checkpoints


def library_versions() -> dict[str, str]:
    return {
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def _serialized(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write a checkpoint dict atomically."""
    save_checkpoints({Path(path): checkpoint})


def save_checkpoints(checkpoints: dict[Path, dict]) -> None:
    """Write checkpoints so that a failure (a full disk) changes none of them; each is put in
    place in the order given."""
    write_files({path: _serialized(checkpoint) for path, checkpoint in checkpoints.items()})


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint as data (weights_only=True): a pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint (train one with: python train.py)")
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before refusing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = first_line(e)
        if reason.startswith("Weights only load failed"):
            reason = _refusal(str(e))
        raise UserError(
            f"{path}: not a loadable checkpoint: {reason[:200]} (train a new one)"
        ) from None
    needed = {"format", "arch", "arch_kwargs", "state_dict", "mean", "std", "class_names"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise UserError(
            f"{path}: not a checkpoint of this project (train one with: python train.py)"
        )
    if type(ckpt["format"]) is not int or ckpt["format"] != CHECKPOINT_FORMAT:
        shown = repr(ckpt["format"])[:40]
        raise UserError(f"{path}: checkpoint format {shown} is not {CHECKPOINT_FORMAT}")
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"{path}: {problem} (a damaged or hand-edited checkpoint; train a new one)")
    return ckpt


MAX_CLASSES = 1000
MAX_WIDTH = 1024


def _arch_problem(arch, kwargs) -> str | None:
    """What makes a checkpoint's architecture or its arguments unusable."""
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        return f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}"
    parameters = set(inspect.signature(ARCHITECTURES[arch]).parameters)
    if not isinstance(kwargs, dict) or not kwargs.keys() <= parameters:
        return f"arch_kwargs {kwargs!r} are not arguments of {arch} ({', '.join(parameters)})"
    bounds = {"num_classes": (2, MAX_CLASSES), "width": (1, MAX_WIDTH)}
    for key, value in kwargs.items():
        low, high = bounds.get(key, (1, MAX_WIDTH))
        if type(value) is not int or not low <= value <= high:
            return f"arch_kwargs {key}={value!r} is not a whole number in {low}..{high}"
    return None


def _checkpoint_problem(ckpt: dict) -> str | None:
    """What makes a checkpoint's fields unusable, checked before anything is built from them:
    an unknown architecture, its arguments, the class names for its head, the normalization."""
    kwargs, names = ckpt["arch_kwargs"], ckpt["class_names"]
    problem = _arch_problem(ckpt["arch"], kwargs)
    if problem:
        return problem
    problem = class_names_problem(names) or _weights_problem(ckpt["state_dict"])
    if problem:
        return problem
    if len(names) != kwargs.get("num_classes", 10):
        return f"{len(names)} class names for a {kwargs.get('num_classes', 10)}-class network"
    for key, low in (("mean", 0), ("std", 1 / 255)):  # of pixels scaled to 0..1
        value = ckpt[key]
        if type(value) not in (int, float) or not low <= value <= 1:
            return f"{key} {value!r} is not a pixel statistic of pixels scaled to 0..1"
    return _record_problem(ckpt)


def _weights_problem(state_dict) -> str | None:
    """What makes a state_dict unusable: not names to tensors, or weights not all finite (NaN
    or infinite weights predict class 0 for every image, with NaN probabilities)."""
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        return "state_dict is not a dictionary of named weight tensors"
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"weight {name[:60]} is not finite (NaN or infinite values)"
    return None


EPOCH_RECORD = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
OPTIONAL_EPOCH_RECORD = ("val_loss_calibrated",)  # runs of older versions lack it


def _record_problem(ckpt: dict) -> str | None:
    """What makes a checkpoint's record of its training unusable for the report: the
    temperature, the history of epochs, where its data came from (all optional)."""
    temperature = ckpt.get("temperature", 1.0)
    if type(temperature) not in (int, float) or not 0 < temperature < math.inf:
        return f"temperature {temperature!r} is not a positive number"
    history = ckpt.get("history", [])
    if not isinstance(history, list) or not all(map(_epoch_record, history)):
        return f"history is not a list of epoch records ({', '.join(EPOCH_RECORD)})"
    if "config" in ckpt and not isinstance(ckpt["config"], dict):
        return "config is not a dictionary of settings"
    seen = ckpt.get("seen_rows", {})
    if "seen_rows" in ckpt and not (
        isinstance(seen, dict) and all(map(_hashes, (seen.get("train"), seen.get("val"))))
    ):
        return "seen_rows is not the leak guard's row hashes (int64 tensors train and val)"
    data = ckpt.get("data", {"source": "", "train_rows": 0, "val_rows": 0})
    if not (
        isinstance(data, dict)
        and isinstance(data.get("source"), str)
        and all(type(data.get(key)) is int for key in ("train_rows", "val_rows"))
    ):
        return "data is not a record of the training source and its row counts"
    if not isinstance(ckpt.get("curves", ""), str):
        return "curves is not a caption"
    return None


MAX_EPOCHS = 10_000


def _hashes(value) -> bool:
    """Whether `value` is a list of the leak guard's row hashes: a 1-D int64 tensor."""
    return isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.ndim == 1


def _epoch_record(row) -> bool:
    """Whether a history row is an epoch record: a whole epoch 1..MAX_EPOCHS and finite figures."""
    if not isinstance(row, dict) or not all(type(row.get(k)) in (int, float) for k in EPOCH_RECORD):
        return False
    optional = [row[k] for k in OPTIONAL_EPOCH_RECORD if k in row]
    return (
        type(row["epoch"]) is int
        and 1 <= row["epoch"] <= MAX_EPOCHS
        and all(math.isfinite(row[k]) for k in EPOCH_RECORD)
        and all(type(v) in (int, float) and math.isfinite(v) for v in optional)
    )


def _refusal(message: str) -> str:
    """torch's multi-line refusal of a pickle that holds code, as one clause."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    details = [
        line.split("WeightsUnpickler error:")[-1].strip()
        for line in lines[1:]
        if not line.startswith("Check the documentation")
    ]
    return "; ".join(["it holds code or objects a checkpoint must not", *filter(None, details)])


def model_from_checkpoint(ckpt: dict, where: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights."""
    net = build(ckpt["arch"], **ckpt["arch_kwargs"])
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{where}: weights do not fit {ckpt['arch']}: {first_line(e)}") from None
    return net
