"""Images and labels in memory (or read from disk on access), as the build pipeline and the load tests use them."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from ..preprocess import Preprocessor

__all__ = ["ImageDataset", "FileImages"]


@dataclass
class ImageDataset:
    """Images and integer labels.

    Attributes:
        name: dataset name.
        images: a sequence of uint8 arrays, ``HxW`` (grayscale) or ``HxWx3`` (RGB).
        labels: int64 array ``[N]``.
        class_names: label names.
        mean, std: per-channel normalisation statistics to build models with.
        test_index: indices of an official test set, if the dataset has one (it then stays the
            test split; train and calibration come from the other indices).
    """

    name: str
    images: Sequence[np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    test_index: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.images[i]))

    def image_bytes(self, i: int, fmt: str = "PNG") -> bytes:
        """Image ``i`` encoded as a client would send it."""
        buf = io.BytesIO()
        self.image(i).save(buf, format=fmt)
        return buf.getvalue()

    def subset(self, index: np.ndarray) -> "ImageDataset":
        images = (self.images.subset(index) if isinstance(self.images, FileImages)
                  else [self.images[i] for i in index])
        return ImageDataset(self.name, images, self.labels[index], self.class_names, self.mean, self.std)

    def sample(self, count: int, seed: int = 0) -> "ImageDataset":
        """``count`` images drawn at random (seeded), so that a small subset keeps the class mix of the
        whole (an official test set or an ImageFolder tree is stored class by class)."""
        if count >= len(self):
            return self
        return self.subset(np.random.default_rng(seed).permutation(len(self))[:count])

    def tensors(self, preprocessor: Preprocessor, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one ``[N, 3, S, S]`` tensor (through ``preprocessor``) and labels ``[N]``."""
        it = range(len(self))
        if progress:
            it = tqdm(it, desc=f"preprocess {self.name}", unit="img", leave=False)
        x = torch.stack([preprocessor.from_image(self.image(i)) for i in it]) if len(self) else torch.empty(0)
        return x, torch.as_tensor(self.labels, dtype=torch.long)


class FileImages(Sequence):
    """Images read from disk on access, so an ImageFolder tree is not held in memory.

    Args:
        paths: image file paths.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        try:
            with Image.open(self.paths[i]) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {self.paths[i]!r}: {exc}; remove or replace the file") from None

    def subset(self, index: Sequence[int]) -> "FileImages":
        return FileImages([self.paths[i] for i in index])
