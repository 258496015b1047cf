"""Photo files, read without PyTorch: the image files a path names (list_images), and a photo opened upright in RGB,
or one line that says why it cannot be (read_photo). image_loader.load_image (photos for the model) and runner.py
(photos for an export) both read with these, so that they read and refuse the same files.

    read_photo("photo.jpg", DataError)   # PIL RGB image, upright; DataError("photo.jpg: no such file") ...
"""

import contextlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif"}


class UnreadableImage(Exception):
    """An image that cannot be read: reported in one line, and the other images still described."""


def list_images(path):
    """An image path, or every image file directly in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [path]


def to_rgb(im):
    """A PIL image in RGB: 16-bit greyscale scaled to 8 bits, transparency laid over white."""
    if im.mode.startswith("I"):  # 16-bit greyscale (I;16, or I from older Pillows): convert() would clip it
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)  # transparency over white, not black
    return im.convert("RGB")


@contextlib.contextmanager
def open_image(path):
    """Image.open, refusing images over Pillow's pixel limit: Pillow only warns between MAX_IMAGE_PIXELS and
    twice that, so the warning is made an error (DecompressionBombWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            yield im


def read_photo(path, error=UnreadableImage, size=None, name=None):
    """Open an image as upright RGB, or raise `error` with one line saying why not. path: a file's path, or a
    binary file object (an upload held in memory; `name` then labels it in errors). size: the side the image
    will be resized to: a JPEG at least twice as large each way is decoded at a reduced scale (DCT scaling,
    1/2 to 1/8, never below size) rather than in full and then shrunk, so a 12-megapixel phone photo costs
    little more than a small one."""
    name = name or path
    try:
        with open_image(path) as im:
            if size and im.format == "JPEG":
                im.draft("RGB", (size, size))
            return to_rgb(ImageOps.exif_transpose(im))  # phones store rotation in EXIF: caption it upright
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except IsADirectoryError:
        raise error(f"{name}: is a folder") from None
    except PermissionError:
        raise error(f"{name}: not allowed to read it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise error(f"{name}: refused: over {Image.MAX_IMAGE_PIXELS:,} pixels, too large to be a photo") from None
    except UnidentifiedImageError:
        raise error(f"{name}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise error(f"{name}: unreadable image ({e})") from None


# PIL's transposes that turn a photo clockwise by 90, 180 and 270 degrees (ROTATE_90 is anticlockwise)
TURNS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def turned(image, degrees):
    """A PIL image turned clockwise by 0, 90, 180 or 270 degrees: upright, where `degrees` is the turn that makes
    it so (the text's direction, or the photo check's upright head)."""
    return image.transpose(TURNS[degrees]) if degrees else image
