"""Datasets that live in a local folder: CIFAR-10, SVHN (torchvision's on-disk formats) and ImageFolder trees.

Nothing downloads: ``torchvision.datasets`` is called with ``download=False``. A folder that is
missing or does not hold what torchvision expects is a :class:`DataError` whose one-line message
names the files expected and where.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import DataError
from .images import FileImages, ImageDataset

__all__ = ["cifar10", "svhn", "imagefolder"]



def _short(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, cut to ``limit`` characters."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_root(name: str, root: Optional[str], expected: str) -> str:
    if not root:
        raise DataError(f"dataset {name} reads a local folder: pass --data-root DIR, where DIR holds {expected}")
    if not os.path.isdir(root):
        raise DataError(f"{name}: --data-root {root!r} is not a directory; expected a folder holding {expected}")
    return root


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of ``[N, H, W, 3]`` uint8 images (a strided sample is enough)."""
    sample = images[:: max(1, len(images) // 10000)].astype(np.float32) / 255.0
    return sample.mean(axis=(0, 1, 2)).tolist(), sample.std(axis=(0, 1, 2)).tolist()


def _assemble(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              class_names: list[str]):
    """One ImageDataset of official train followed by official test, with the test indices recorded."""
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    mean, std = _channel_stats(train_x)
    test_index = np.arange(len(train_x), len(images))
    return ImageDataset(name, images, labels, class_names, mean, std, test_index=test_index)


def cifar10(root: Optional[str] = None):
    """CIFAR-10 from ``root/cifar-10-batches-py/`` (the extracted python version of the archive).

    ``root`` may also be the ``cifar-10-batches-py`` folder itself.
    """
    from torchvision.datasets import CIFAR10

    expected = ("cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta "
                "(cifar-10-python.tar.gz extracted)")
    root = _require_root("cifar10", root, expected)
    if os.path.basename(os.path.normpath(root)) == CIFAR10.base_folder:
        root = os.path.dirname(os.path.normpath(root)) or "."
    folder = os.path.join(root, CIFAR10.base_folder)
    names = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = [f for f in names if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"cifar10: {folder!r} lacks {', '.join(missing)}; expected {expected}")
    try:
        train = CIFAR10(root, train=True, download=False)
        test = CIFAR10(root, train=False, download=False)
    except Exception as exc:  # noqa: BLE001 - checksum mismatch, truncated pickle, ...
        raise DataError(f"cifar10: the files in {folder!r} are corrupted or not the python version of "
                        f"CIFAR-10 ({_short(exc)}); re-extract cifar-10-python.tar.gz there") from None
    return _assemble("cifar10", np.asarray(train.data), np.asarray(train.targets),
                     np.asarray(test.data), np.asarray(test.targets), list(train.classes))


def svhn(root: Optional[str] = None):
    """SVHN (cropped digits) from ``root/train_32x32.mat`` and ``root/test_32x32.mat``."""
    from torchvision.datasets import SVHN

    expected = "train_32x32.mat and test_32x32.mat (SVHN format 2, cropped digits)"
    root = _require_root("svhn", root, expected)
    missing = [SVHN.split_list[s][1] for s in ("train", "test")
               if not os.path.isfile(os.path.join(root, SVHN.split_list[s][1]))]
    if missing:
        raise DataError(f"svhn: {root!r} lacks {', '.join(missing)}; expected {expected}")
    try:
        train = SVHN(root, split="train", download=False)
        test = SVHN(root, split="test", download=False)
    except Exception as exc:  # noqa: BLE001 - checksum mismatch, unreadable .mat, ...
        raise DataError(f"svhn: the .mat files in {root!r} are corrupted or not SVHN format 2 "
                        f"({_short(exc)}); copy the original files there") from None
    to_hwc = lambda d: np.ascontiguousarray(np.transpose(np.asarray(d), (0, 2, 3, 1)))  # noqa: E731
    return _assemble("svhn", to_hwc(train.data), np.asarray(train.labels), to_hwc(test.data),
                     np.asarray(test.labels), [str(i) for i in range(10)])


def _folder_samples(path: str) -> tuple[list[str], np.ndarray, list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        # ImageFolder is used for its class discovery and file filtering only; images load lazily.
        folder = ImageFolder(path, allow_empty=False)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder: {path!r} is not a class-per-folder image tree ({_short(exc)}); "
                        f"expected {path}/<class name>/<image>.png|jpg ...") from None
    paths = [p for p, _ in folder.samples]
    labels = np.asarray([t for _, t in folder.samples], dtype=np.int64)
    return paths, labels, list(folder.classes)


def imagefolder(root: Optional[str] = None):
    """Any ImageFolder tree: ``root/<class>/<image>``, or ``root/train/<class>/...`` with
    ``root/test/<class>/...`` (or ``root/val/...``) as the official test set.

    Images keep their own size on disk and are resized by the model's preprocessor; normalisation
    defaults to ImageNet statistics (what pretrained torchvision weights expect).
    """
    expected = "<class name>/<image> folders, or train/<class>/... and test/<class>/..."
    root = _require_root("imagefolder", root, expected)
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    test_name = "test" if "test" in subdirs else "val"
    if set(subdirs) == {"train", test_name}:
        train_paths, train_y, classes = _folder_samples(os.path.join(root, "train"))
        test_paths, test_y, test_classes = _folder_samples(os.path.join(root, test_name))
        if test_classes != classes:
            raise DataError(f"imagefolder: {root}/train and {root}/{test_name} have different class folders "
                            f"({classes} vs {test_classes}); give both the same classes")
        paths, labels = train_paths + test_paths, np.concatenate([train_y, test_y])
        test_index: Optional[np.ndarray] = np.arange(len(train_paths), len(paths))
    else:
        paths, labels, classes = _folder_samples(root)
        test_index = None
    return ImageDataset("imagefolder", FileImages(paths), labels, classes, list(IMAGENET_MEAN), list(IMAGENET_STD),
                        test_index=test_index)
