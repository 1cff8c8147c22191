"""Your own images as MNIST digits: a photo, a scan or a drawing in any format Pillow reads,
prepared the way MNIST was made. Pillow and numpy only (no torch), so that the web server
(serve.py) can prepare images without importing torch."""

import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from cli import UserError, first_line


def preprocess_image(source: str | Path | IO[bytes], name: str | None = None) -> np.ndarray:
    """An image file (a path, or a binary file called `name` in messages) as an MNIST digit:
    grayscale, light background inverted, cropped to the ink, fitted into 20x20 keeping the
    aspect ratio, centred by centre of mass in 28x28 (uint8)."""
    from PIL import Image

    name = name or str(source)
    img = _open_image(source, name)
    try:
        ink = _ink(img)
    except (ValueError, OSError) as e:  # a colour mode with no way to gray
        raise UserError(f"{name}: not a readable image: {first_line(e)}") from None
    if ink.max() <= 0:
        raise UserError(f"{name}: no digit found (the image is blank)")
    ink = ink / ink.max()
    ink[ink < 0.15] = 0  # paper texture, JPEG ringing
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = ink.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    fitted = Image.fromarray(np.uint8(ink * 255)).resize(size, Image.Resampling.LANCZOS)
    patch = np.asarray(fitted, dtype=np.float64)
    mass = patch.sum()
    cy = (patch.sum(1) * np.arange(patch.shape[0])).sum() / mass
    cx = (patch.sum(0) * np.arange(patch.shape[1])).sum() / mass
    # MNIST puts the centre of mass at pixel (14, 14), measured on its test set: 13.99, 14.01
    top = min(max(round(14 - cy), 0), 28 - patch.shape[0])
    left = min(max(round(14 - cx), 0), 28 - patch.shape[1])
    out = np.zeros((28, 28), np.uint8)
    out[top : top + patch.shape[0], left : left + patch.shape[1]] = np.asarray(fitted)
    return out


MAX_IMAGE_PIXELS = 50_000_000  # 8,660 x 5,773: larger than any phone photo of a digit
WORK_SIDE = 1024  # an image's longest side while it is prepared; the digit ends 20 pixels tall
# What photos, scans and drawings come as (JPEG includes phones' multi-picture files). Containers
# that decode an embedded image on opening, before its size can be checked (ICO, CUR), and
# formats no camera or drawing program writes (DDS and the like) are refused unread.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16- and 32-bit gray, float gray


class ImageTooLarge(UserError):
    """An image over MAX_IMAGE_PIXELS, refused before its pixels are decoded."""


def _open_image(source: str | Path | IO[bytes], name: str):
    """The image, loaded at most WORK_SIDE pixels on its longest side (a JPEG decoded at a
    reduced scale): memory stays bounded; one over MAX_IMAGE_PIXELS is refused unread."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, str | Path) and Path(source).exists() and not Path(source).is_file():
        raise UserError(f"{name}: is a directory, pipe or device, not an image file")
    Image.init()  # every plugin registered, so that FORMATS can name them
    try:
        with quiet_c_stderr(), warnings.catch_warnings():  # libtiff's and Pillow's messages
            warnings.simplefilter("ignore")
            with Image.open(source, formats=FORMATS) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{img.width} x {img.height}")
                img.draft(None, (WORK_SIDE, WORK_SIDE))
                img = ImageOps.exif_transpose(img)
                img.load()
    except FileNotFoundError:
        raise UserError(f"{name}: no such image file") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"{name}: more than {MAX_IMAGE_PIXELS:,} pixels, too large to read (resize it)"
        ) from None
    except UnidentifiedImageError:
        kinds = ", ".join(FORMATS[:-1])
        raise UserError(f"{name}: not a readable image (give a {kinds} or PPM file)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's for damaged files
        raise UserError(f"{name}: not a readable image: {first_line(e)}") from None
    img.thumbnail((WORK_SIDE, WORK_SIDE))
    return img


@contextmanager
def quiet_c_stderr() -> Iterator[None]:
    """Standard error (file descriptor 2) pointed at /dev/null for the block: libtiff writes its
    own line there for a damaged file ("Using code not yet in table."), before the one line that
    reports the image. Python's own output in the block is lost too, so the block is kept to
    decoding alone."""
    with _STDERR_SWAP:  # threads (serve.py's) take turns, so that each restores the real one
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)


_STDERR_SWAP = threading.Lock()


def _ink(img) -> np.ndarray:
    """Ink intensity (float, background 0): transparency when the image has any, else the gray
    levels, inverted when the border (the background) is light."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        alpha = np.asarray(img.convert("RGBA"), dtype=np.float64)[..., 3]
        if alpha.min() < 255:
            return alpha - alpha.min()
    gray = _gray(img)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = background - gray if background >= 128 else gray - background
    return np.clip(ink, 0, None)


def _gray(img) -> np.ndarray:
    """Gray levels 0..255 (float): 16-bit, 32-bit and float scans stretched from their own
    darkest to lightest value (converting them to 8 bits would clip them to white), LAB
    images by their lightness."""
    if img.mode in WIDE_MODES:
        gray = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(gray)
        if not finite.any():
            return np.zeros_like(gray)
        low, high = gray[finite].min(), gray[finite].max()
        gray = np.clip(np.nan_to_num(gray, nan=low, posinf=high, neginf=low), low, high)
        return (gray - low) * (255 / (high - low)) if high > low else np.zeros_like(gray)
    if img.mode == "LAB":
        return np.asarray(img.getchannel(0), dtype=np.float64)
    return np.asarray(img.convert("L"), dtype=np.float64)
