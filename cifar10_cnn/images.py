"""Image files and encoded images -> the model's input: uint8 RGB `[32, 32, 3]`, made the same way for every caller.

Images come from users, so each one is checked before it is decoded: its size, its pixel count
(decompression bombs), and whether it decodes at all. Each problem is an `UnreadableImage` naming the
image, and a caller can skip that image and go on with the others.

This file imports nothing from the project (only numpy and Pillow): it is copied into every logged
model beside serving.py, so a served model converts an uploaded image exactly as the predict command
converts a file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 50 * 2**20  # larger files are refused before they are read
MAX_PIXELS = 40_000_000  # width x height; a 40-megapixel photo passes, a decompression bomb does not
# A served request decodes at most this many pixels in all (width x height before resizing: 1,024 VGA
# photos, about 80 from a phone; seconds of decoding): 1,024 small files that each pass MAX_PIXELS would
# otherwise keep a worker decoding for minutes after the client's timeout.
MAX_REQUEST_PIXELS = 1_000_000_000
SIZE = (32, 32)  # width, height the networks take
# What photos and image files come as. Pillow reads more (DDS, EPS through Ghostscript, FITS, ...): formats
# nobody sends a classifier, each a decoder more for a hostile file to reach.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")  # JPEG includes MPO


class UnreadableImage(ValueError):
    """This image cannot be turned into a model input; the message says why."""


class PixelBudget:
    """What one request may decode in all: each image's pixels are taken from it before it is decoded."""

    def __init__(self):
        self.pixels = self.left = MAX_REQUEST_PIXELS

    def spend(self, width: int, height: int, name: str) -> None:
        self.left -= width * height
        if self.left < 0:
            raise UnreadableImage(f"{name}: the request's images hold more than {self.pixels:,} pixels in all; "
                                  "send large images in smaller requests")


def decode(data: bytes, name: str, budget: PixelBudget | None = None) -> np.ndarray:
    """Decode one encoded image (one of FORMATS) into uint8 `[32, 32, 3]`: EXIF-rotated, 8-bit RGB,
    resized with Pillow's antialiased bilinear filter. `name` says which image, in errors; `budget`, if
    given, pays for its pixels before they are decoded."""
    from PIL import Image, ImageOps

    if not data:
        raise UnreadableImage(f"{name}: empty")
    if len(data) > MAX_FILE_BYTES:
        raise UnreadableImage(f"{name}: {len(data) / 2**20:.0f} MiB is larger than the "
                              f"{MAX_FILE_BYTES // 2**20} MiB limit")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_PIXELS and twice that; every bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise UnreadableImage(f"{name}: {width}x{height} pixels is more than the {MAX_PIXELS:,} "
                                          "allowed (a decompression bomb?)")
                if budget is not None:
                    budget.spend(width, height, name)
                image = eight_bit(ImageOps.exif_transpose(image), name)
                rgb = image.convert("RGB")  # palette, grey, RGBA (alpha dropped), CMYK: all to RGB
                if rgb.size != SIZE:
                    rgb = rgb.resize(SIZE, Image.Resampling.BILINEAR)  # antialiased when shrinking
                return np.asarray(rgb, dtype=np.uint8)  # [32, 32, 3]
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(f"{name}: too many pixels (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"{name}: not an image file of a format taken here ({', '.join(FORMATS)})") from None
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, struct.error (EXIF), ...
        raise UnreadableImage(f"{name}: corrupt image ({exc or type(exc).__name__})") from None


def eight_bit(image, name: str):
    """16- and 32-bit integer grey images scaled to 8 bits over their type's range (0..65535 -> 0..255;
    signed ones shifted first), as a viewer shows them: Pillow's convert would clip them, most pixels to
    white. A 32-bit image holding only 0..65535 (how some 16-bit files open) is taken as 16-bit. Float
    images have no range to scale from, so they are refused."""
    from PIL import Image

    if image.mode == "F":
        raise UnreadableImage(f"{name}: a floating-point image (mode F); save it with 8 or 16 bits per channel")
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    pixels = np.asarray(image).astype(np.float32)  # float64 would take 320 MB at MAX_PIXELS
    if image.mode == "I" and pixels.min() < 0:  # int32, signed values
        low, high = -(2.0**31), 2.0**31 - 1
    elif image.mode == "I":  # int32: 16-bit values in it, or the positive range
        low, high = 0.0, 65535.0 if pixels.max() <= 65535 else 2.0**31 - 1
    else:
        low, high = (-32768.0, 32767.0) if image.mode.endswith("S") else (0.0, 65535.0)
    return Image.fromarray(np.clip(np.rint((pixels - low) * 255 / (high - low)), 0, 255).astype(np.uint8), "L")


def load(path: Path) -> np.ndarray:
    """Decode one file into uint8 `[32, 32, 3]` (see decode); its size is checked before it is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not path.is_file():
        raise UnreadableImage(f"{path}: not a regular file ({kind(path)})")
    if size == 0:
        raise UnreadableImage(f"{path}: empty file")
    if size > MAX_FILE_BYTES:
        raise UnreadableImage(f"{path}: {size / 2**20:.0f} MiB is larger than the {MAX_FILE_BYTES // 2**20} MiB limit")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return decode(data, str(path))


def kind(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    import stat

    mode = path.stat().st_mode
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"{name}{' behind a symbolic link' if path.is_symlink() else ''}"
    return "a special file"


def files_under(path: Path) -> list[Path]:
    """`path` itself if it is not a folder, else everything non-hidden below it that is not a folder, sorted:
    pipes, devices, broken or looping links and links to folders (not followed) are listed too, so that
    the caller reports each as unreadable instead of leaving it out without a word."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = [p for p in path.rglob("*") if (not p.is_dir() or p.is_symlink())
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(found)
