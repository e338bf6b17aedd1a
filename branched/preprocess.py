"""Bytes -> image -> normalised tensor, the same way for datasets, TorchServe and Ray Serve.

Both servers and the evaluation code go through :class:`Preprocessor`, so a served answer equals
the answer the core gives on the dataset's own tensors. Limits are checked on the header, before
the pixels are decoded.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .errors import ImageError

__all__ = ["ImageLimits", "Preprocessor", "decode_image"]


@dataclass(frozen=True)
class ImageLimits:
    """What a request may carry.

    Args:
        max_bytes: largest encoded image accepted (10 MiB).
        max_pixels: largest width x height accepted (4096 x 4096), checked from the header before the
            pixels are decoded, so a small file that declares a huge image costs nothing.
        min_side: smallest width or height accepted (8: the smallest images of common datasets, e.g.
            scikit-learn's 8x8 digits; a 1x1 image carries nothing a classifier could use and is
            almost always a client bug, such as a tracking pixel or a placeholder).
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    min_side: int = 8


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode PNG/JPEG/... bytes into an 8-bit RGB image, enforcing ``limits``.

    Grayscale, palette, CMYK, RGBA and 16-bit images are converted to RGB the way PIL's
    ``convert("RGB")`` and ``torchvision.io.decode_image(mode=RGB)`` do (alpha is dropped); 16-bit
    images are scaled to 8 bits first.

    Raises:
        ImageError: empty, oversized, non-image, truncated or out-of-limits input.
    """
    if not data:
        raise ImageError("empty request body: send the image bytes (PNG or JPEG)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageError(f"image is {width}x{height}; the limit is {limits.max_pixels} pixels "
                                 "(width x height): send a smaller image")
            if min(width, height) < limits.min_side:
                raise ImageError(f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own bomb check fires inside Image.open, before our size check could.
        raise ImageError(f"image too large; the limit is {limits.max_pixels} pixels ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError("body is not an image PIL can read (send PNG or JPEG bytes)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image could not be decoded (truncated or corrupt): {exc}") from None
    return _to_rgb8(img)


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # via RGBA: a palette with transparency converts without a warning
    return img.convert("RGB") if img.mode != "RGB" else img


class Preprocessor:
    """Image -> ``[3, S, S]`` float tensor: resize to the model's input size, scale, normalise.

    Args:
        input_size: side of the square model input.
        mean, std: per-channel normalisation after scaling to [0, 1].
        limits: request limits used by :meth:`from_bytes`.
    """

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float],
                 limits: ImageLimits = ImageLimits()) -> None:
        self.limits = limits
        self.transform = v2.Compose([
            v2.ToImage(),
            v2.Resize((input_size, input_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])

    @classmethod
    def for_config(cls, config, limits: ImageLimits = ImageLimits()) -> "Preprocessor":
        return cls(config.input_size, config.mean, config.std, limits)

    def from_image(self, img: Image.Image) -> torch.Tensor:
        return self.transform(_to_rgb8(img))

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Decode and transform; raises :class:`ImageError` for bad input."""
        return self.from_image(decode_image(data, self.limits))
