"""Image datasets: the torchvision sets, ImageNet and ``ImageFolder`` trees.

Files are read from ``DATA_DIR/<name>`` (``DATA_DIR`` itself is also tried, for data kept
directly there); nothing is downloaded unless ``download=True``, and ``imagenet`` cannot be
downloaded at all. ``emnist`` is EMNIST's ``balanced`` split (K = 47, 28×28). Transforms
(``augment=True``; with ``augment=False`` training uses the test transform):

=================  ===============================================  ==========================
dataset            training augmentation                            test
=================  ===============================================  ==========================
mnist, fashion     RandomCrop(28, padding=2)                        —
emnist             RandomCrop(28, padding=2)                        —
cifar10/100        RandomCrop(32, padding=4), horizontal flip       —
svhn               RandomCrop(32, padding=4)                        —
stl10              RandomCrop(96, padding=12), horizontal flip      —
imagenet           RandomResizedCrop(s), horizontal flip            Resize(s·256/224), Crop(s)
imagefolder        RandomCrop(s, padding=s//8), horizontal flip     Resize(s), CenterCrop(s)
=================  ===============================================  ==========================

followed by ``ToTensor`` and per-channel normalisation with the dataset's usual mean and std
(``imagefolder``: ImageNet's unless ``mean``/``std`` are given). ``cifar10`` falls back to the
JPEG layout ``DATA_DIR/cifar10-jpg/{train,test}/<class>/*.jpg`` when the torchvision binary
files are absent (same classes in the same order, CIFAR-10 transforms).

The dataset option ``transforms="released"`` (torchvision sets only) uses instead the
transforms of the paper's released code (``nc/datasets.py``), for runs comparable with it:

=================  ===============================================  ==========================
dataset            training (before ToTensor, Normalize)            test
=================  ===============================================  ==========================
mnist              Grayscale(3), Resize(32), RandomRotation(25)     Grayscale(3), Resize(32)
fashion-mnist      Grayscale(3), Resize(32), flip, RandomCrop(32,4)  Grayscale(3), Resize(32)
emnist             Grayscale(3), Resize(32)                         Grayscale(3), Resize(32)
cifar10, cifar100  flip, RandomCrop(32, padding=4)                  —
svhn               RandomRotation(25)                               —
stl10              flip, RandomCrop(96, padding=4)                  —
=================  ===============================================  ==========================

with the released code's normalisation (the one-channel mean and std of the grey sets
applied to all three channels; CIFAR-10 std (0.2023, 0.1994, 0.2010)). So MNIST-like sets
become ``(3, 32, 32)`` images. Rotations, grey-to-RGB and a flip before the crop are not
among the transforms :mod:`gnc.data.device` performs: these sets take the PIL path (with
``data_on_device="auto"``; ``"on"`` is an error).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from .base import DatasetBundle, DatasetNotFoundError, as_long
from .device import check_image_headers, header_size, load_rgb

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torchvision import transforms as T

__all__ = ["NORMALIZATION", "load_imagefolder", "load_imagenet", "load_torchvision"]

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "emnist": ((0.1751,), (0.3332,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Per-channel (mean, std) of each dataset's training images, for ``Normalize``."""

# name -> (torchvision class name, marker path under the root, image side, crop padding, flip)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", 28, 2, False),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", 28, 2, False),
    "emnist": ("EMNIST", "EMNIST/raw", 28, 2, False),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 32, 4, True),
    "cifar100": ("CIFAR100", "cifar-100-python", 32, 4, True),
    "svhn": ("SVHN", "train_32x32.mat", 32, 4, False),
    "stl10": ("STL10", "stl10_binary", 96, 12, True),
}
_NUM_CLASSES = {"cifar100": 100, "emnist": 47}
_GREY = ("mnist", "fashion-mnist", "emnist")
TRANSFORMS = ("default", "released")


def _released(name: str, augment: bool) -> tuple[list[object], list[object], tuple, tuple, int]:
    """The released code's (training, test) transforms before ``ToTensor``, its normalisation
    and image side (module table)."""
    mean, std = NORMALIZATION[name]
    if name == "cifar10":
        std = (0.2023, 0.1994, 0.2010)  # the released code's (widespread) CIFAR-10 std
    side = {"stl10": 96}.get(name, 32)
    T = _transforms()
    test: list[object] = [T.Grayscale(3), T.Resize(32)] if name in _GREY else []
    flip_crop = [T.RandomHorizontalFlip(), T.RandomCrop(side, padding=4)]
    aug: list[object] = {
        "mnist": [T.RandomRotation(25)], "fashion-mnist": flip_crop, "emnist": [],
        "cifar10": flip_crop, "cifar100": flip_crop, "svhn": [T.RandomRotation(25)],
        "stl10": flip_crop,
    }[name]
    return [*test, *aug] if augment else test, test, mean, std, side


def _not_found(name: str, path: Path, extra: str = "") -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found under {path}{extra}; put the files there or pass --download "
        "(download=True)"
    )


def _find_root(data_dir: Path, name: str, marker: str) -> Path | None:
    for root in (data_dir / name, data_dir):
        if (root / marker).exists():
            return root
    return None


def _compose(
    augmentation: Sequence[object], mean: Sequence[float], std: Sequence[float]
) -> T.Compose:
    T = _transforms()
    return T.Compose([*augmentation, T.ToTensor(), T.Normalize(mean, std)])


def _transforms():
    """``torchvision.transforms``, imported when an image set is loaded: importing torchvision
    takes 1–2 s, which the other datasets, the report and ``--jobs`` workers should not pay."""
    from torchvision import transforms

    return transforms


def _datasets():
    """``torchvision.datasets`` (imported on first use, as :func:`_transforms`)."""
    from torchvision import datasets

    return datasets


def _targets(ds: Dataset) -> torch.Tensor:
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels  # SVHN, STL10
    return as_long(labels)


def _check_labels(name: str, root: Path, ds: Dataset, num_classes: int) -> None:
    """A split whose files torchvision read but whose labels are not one per image in
    [0, num_classes) (a damaged MNIST label file: an index error in the first step, after
    the run directory was made, or silently fewer samples on the device path)."""
    labels = _targets(ds)
    problem = None
    if len(labels) != len(ds):
        problem = f"{len(ds)} images but {len(labels)} labels"
    elif labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        problem = (f"labels in [{int(labels.min())}, {int(labels.max())}], not in "
                   f"[0, {num_classes})")
    if problem:
        raise DatasetNotFoundError(f"{name} files under {root} are corrupted ({problem}); "
                                   "replace them or pass --download (download=True)")


def load_torchvision(
    name: str, *, data_dir: Path, download: bool = False, augment: bool = True,
    transforms: str = "default",
) -> DatasetBundle:
    """MNIST, Fashion-MNIST, EMNIST (balanced), CIFAR-10/100, SVHN or STL-10 via torchvision.

    Args:
        name: ``mnist``, ``fashion-mnist``, ``emnist``, ``cifar10``, ``cifar100``, ``svhn``,
            ``stl10``.
        data_dir: the data folder; files are looked for in ``data_dir/name``, then
            ``data_dir`` (and, for ``cifar10``, JPEG folders in ``data_dir/cifar10-jpg``).
        download: download into ``data_dir/name`` when missing.
        augment: training augmentation (module table).
        transforms: ``"default"`` (the first table) or ``"released"`` (the paper's released
            code, the second table).

    Raises:
        DatasetNotFoundError: files missing and ``download`` False, or present but rejected by
            torchvision's integrity check.
    """
    if transforms not in TRANSFORMS:
        raise ValueError(f"unknown transforms {transforms!r} for dataset '{name}'; choose "
                         f"from {', '.join(TRANSFORMS)}")
    cls_name, marker, side, padding, flip = _TORCHVISION[name]
    cls, T = getattr(_datasets(), cls_name), _transforms()
    if transforms == "released":
        train_aug, test_pre, mean, std, side = _released(name, augment)
        train_tf, test_tf = _compose(train_aug, mean, std), _compose(test_pre, mean, std)
        channels = 3
    else:
        mean, std = NORMALIZATION[name]
        aug: list[object] = [T.RandomCrop(side, padding=padding)] if augment else []
        if augment and flip:
            aug.append(T.RandomHorizontalFlip())
        train_tf, test_tf = _compose(aug, mean, std), _compose([], mean, std)
        channels = len(mean)
    num_classes = _NUM_CLASSES.get(name, 10)

    root = _find_root(data_dir, name, marker)
    if root is None and name == "cifar10":
        for jpg in (data_dir / "cifar10-jpg", data_dir / "cifar10" / "cifar10-jpg"):
            if (jpg / "train").is_dir():
                return _folder_bundle(
                    "cifar10",
                    jpg / "train",
                    jpg / "test",
                    train_tf,
                    test_tf,
                    (channels, side, side),
                    expected_classes=num_classes,
                )
    if root is None and not download:
        extra = f" (nor JPEG folders under {data_dir / 'cifar10-jpg'})" if name == "cifar10" else ""
        raise _not_found(name, data_dir / name, extra)
    if root is None:
        root = data_dir / name

    def make(train: bool, tf: T.Compose) -> Dataset:
        split: dict[str, object] = (
            {"split": "train" if train else "test"}
            if name in ("svhn", "stl10")
            else {"train": train}
        )
        if name == "emnist":
            split["split"] = "balanced"
        try:
            ds = cls(str(root), transform=tf, download=download, **split)
        # torchvision: "Dataset not found or corrupted" (RuntimeError); MNIST's parser on a
        # damaged file (it checks only that the files exist): AssertionError, TypeError, ...
        except (RuntimeError, AssertionError, TypeError, ValueError, IndexError) as err:
            why = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise DatasetNotFoundError(
                f"{name} files under {root} are missing or corrupted ({why}); replace them or "
                "pass --download (download=True)"
            ) from err
        _check_labels(name, root, ds, num_classes)
        return ds

    train, test = make(True, train_tf), make(False, test_tf)
    classes = getattr(train, "classes", None)
    return DatasetBundle(
        train=train,
        test=test,
        num_classes=num_classes,
        in_shape=(channels, side, side),
        train_targets=_targets(train),
        name=name,
        classes=tuple(classes) if classes else tuple(str(i) for i in range(num_classes)),
    )


def load_imagenet(*, data_dir: Path, augment: bool = True, image_size: int = 224) -> DatasetBundle:
    """ImageNet (ILSVRC-2012) from ``data_dir/imagenet/{train,val}/<wnid>/*.JPEG``.

    That is the layout torchvision's ``ImageNet`` class extracts to (classes sorted by wnid).
    It cannot be downloaded automatically: get it from image-net.org.

    Options: ``image_size`` (s, default 224): train ``RandomResizedCrop(s)`` + flip, test
    ``Resize(round(s·256/224))`` + ``CenterCrop(s)``.
    """
    root = _find_root(data_dir, "imagenet", "train")
    if root is None:
        raise DatasetNotFoundError(
            f"imagenet not found under {data_dir / 'imagenet'} (expected train/<wnid>/*.JPEG "
            "and val/<wnid>/*.JPEG); it cannot be downloaded automatically, even with "
            "--download: get it from image-net.org"
        )
    mean, std = NORMALIZATION["imagenet"]
    T = _transforms()
    test_tf = _compose(
        [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)], mean, std
    )
    train_tf = (
        _compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()], mean, std)
        if augment
        else test_tf
    )
    return _folder_bundle(  # 1.28 million files: their headers are not read up front
        "imagenet", root / "train", root / "val", train_tf, test_tf, (3, image_size, image_size),
        check_files=False,
    )


def load_imagefolder(
    path: str,
    *,
    augment: bool = True,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DatasetBundle:
    """Your own images: ``ImageFolder`` on ``PATH/train`` and (optional) ``PATH/test``.

    Images are read as RGB. Classes are the sub-folder names of ``PATH/train``, sorted.

    Args:
        path: folder holding ``train/<class>/*`` and optionally ``test/<class>/*``.
        augment: training ``RandomCrop(s, padding=s//8)`` + horizontal flip.
        image_size: s; when given every image is resized (shorter side) and centre-cropped to
            s×s. Default: the size of the first training image, and all images must share it.
        mean, std: normalisation (default ImageNet's).
    """
    root = Path(path)
    if not (root / "train").is_dir():
        raise DatasetNotFoundError(
            f"imagefolder: no folder {root / 'train'} (expected {root}/train/<class>/<image>)"
        )
    mean = tuple(mean) if mean is not None else NORMALIZATION["imagenet"][0]
    std = tuple(std) if std is not None else NORMALIZATION["imagenet"][1]
    T = _transforms()
    if image_size is not None:
        size: tuple[int, int] = (image_size, image_size)
        base: list[object] = [T.Resize(image_size), T.CenterCrop(image_size)]
    else:
        first = _image_folder(f"imagefolder:{path}", root / "train").samples
        if not first:
            raise DatasetNotFoundError(f"imagefolder: no images under {root / 'train'}")
        size = header_size(first[0][0])
        base = []
    aug = [T.RandomCrop(size, padding=min(size) // 8), T.RandomHorizontalFlip()] if augment else []
    return _folder_bundle(
        f"imagefolder:{path}",
        root / "train",
        root / "test",
        _compose([*base, *aug], mean, std),
        _compose(base, mean, std),
        (3, *size),
        same_size=image_size is None,
    )


def _image_folder(name: str, folder: Path, *, transform: T.Compose | None = None,
                  classes: Sequence[str] | None = None) -> Dataset:
    """``ImageFolder`` on ``folder``; with ``classes`` (the training split's), labelled by
    them: a test split may lack a class (empty or no folder; its metrics then list it as
    missing) but not have one the training split lacks."""
    tvd = _datasets()
    if classes is None:
        try:
            return tvd.ImageFolder(str(folder), transform=transform, loader=load_rgb)
        except FileNotFoundError as err:  # torchvision's names the class, not the folder
            raise DatasetNotFoundError(f"{name}: {folder}: {err}") from None
    extra = sorted({e.name for e in os.scandir(folder) if e.is_dir()} - set(classes))
    if extra:
        raise ValueError(f"{name}: the class folders {extra} of {folder} are not training "
                         f"classes (the training split has {len(classes)}: "
                         f"{', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")

    class Split(tvd.ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return list(classes), {c: i for i, c in enumerate(classes)}

    return Split(str(folder), transform=transform, loader=load_rgb, allow_empty=True)


def check_no_link_loops(samples: Sequence[tuple[str, int]], root: Path) -> None:
    """``ValueError`` naming a symbolic link, inside ``root``, to a folder at or above
    itself: ``ImageFolder`` follows links, so ``cat/up -> ..`` counted every other class's
    images again as cats, silently."""
    seen: set[str] = set()
    for folder in sorted({os.path.dirname(p) for p, _ in samples}):
        part = Path(folder)
        while part != root and str(part) not in seen and root in part.parents:
            seen.add(str(part))
            if part.is_symlink():
                target = part.resolve()
                if target == part.parent.resolve() or target in part.parent.resolve().parents:
                    raise ValueError(f"{part} is a symbolic link to {target}, a folder above "
                                     "it: its images would be read again under its class")
            part = part.parent


def _folder_bundle(
    name: str,
    train_dir: Path,
    test_dir: Path,
    train_tf: T.Compose,
    test_tf: T.Compose,
    in_shape: tuple[int, ...],
    *,
    expected_classes: int | None = None,
    same_size: bool = True,
    check_files: bool = True,
) -> DatasetBundle:
    """``ImageFolder`` splits of ``train_dir`` and (when present) ``test_dir``. With
    ``check_files`` every file's header is read first (:func:`gnc.data.device.
    check_image_headers`): a file that is not an image, or (``same_size``) of a size other
    than ``in_shape``'s, is one error naming it, before any run directory exists."""
    train = _image_folder(name, train_dir, transform=train_tf)
    test = (_image_folder(name, test_dir, transform=test_tf, classes=train.classes)
            if test_dir.is_dir() else None)
    if test is None:
        logger.warning("%s: no test split (%s is not a folder): no test metrics", name,
                       test_dir)
    elif not len(test):  # its classes may be absent, not all of its images
        logger.warning("%s: no test split (no images under %s): no test metrics", name,
                       test_dir)
        test = None
    check_no_link_loops(train.samples, train_dir)
    if test is not None:
        check_no_link_loops(test.samples, test_dir)
    if check_files:
        paths = [p for p, _ in train.samples] + ([p for p, _ in test.samples] if test else [])
        check_image_headers(paths, tuple(in_shape[1:]) if same_size else None)
    if expected_classes is not None and len(train.classes) != expected_classes:
        raise ValueError(
            f"{name}: Expected {expected_classes} class folders under {train_dir}, "
            f"but got {len(train.classes)}"
        )
    return DatasetBundle(
        train=train,
        test=test,
        num_classes=len(train.classes),
        in_shape=in_shape,
        train_targets=as_long(train.targets),
        name=name,
        classes=tuple(train.classes),
    )
