"""Device-resident images: decode once, keep the uint8 pixels on the device, augment there.

The PIL path decodes (and for JPEG folders, reads) every image in every epoch on the host,
which starves a GPU: CIFAR-10 with a ResNet-18 spends most of an epoch waiting for data. For
datasets whose uint8 pixels fit on the device this module instead

1. takes the pixels once — the torchvision sets' own arrays (``.data``: exactly what their
   ``__getitem__`` hands to PIL), or, for ``ImageFolder`` trees (``imagefolder:``, CIFAR-10
   JPEGs), every file decoded with PIL as ``ImageFolder`` does (``convert("RGB")``, then the
   transform's deterministic ``Resize``/``CenterCrop``), cached on disk under a key made of
   the files' names, labels and bytes, so a second run skips decoding;
2. keeps them on the device as one ``(N, C, H, W)`` uint8 tensor (CIFAR-10: 150 MiB);
3. per batch, gathers the sampler's indices, draws the transform's ``RandomCrop`` (zero
   padding p, offsets uniform in ``{0..2p}²``) and ``RandomHorizontalFlip`` (p = ½) from a
   CPU generator seeded by (seed, epoch, rank) — one draw per position of the epoch, made when the
   epoch starts, so a resumed run sees the same batches — and normalises as
   ``ToTensor`` + ``Normalize`` do (``x/255``, minus mean, over std): an un-augmented batch
   equals the PIL path's pixels.

Batches come from the same samplers as :func:`~gnc.data.make_loader` (same order). The cache
lives in ``$GNC_CACHE_DIR`` (default ``~/.cache/gnc``); it is never written next to the data
(which may be read-only), and a cache that cannot be written only costs the next run a decode.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .base import DatasetBundle, as_long
from .perturb import RelabelledDataset

__all__ = [
    "DeviceImageLoader",
    "DeviceImages",
    "ImageSpec",
    "crop_flip",
    "device_images",
    "image_spec",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = "gnc-images-v1"
# auto: keep the pixels on a CUDA device when they take at most this share of its memory
AUTO_MAX_SHARE = 0.25


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded, or whose size differs from the others."""


# what PIL raises for a file that is not a (readable) image
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _not_an_image(path: str, err: BaseException) -> ImageDecodeError:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ImageDecodeError(f"{path} is not a readable image ({text})")


@dataclass(frozen=True)
class ImageSpec:
    """The parts of a torchvision transform that the device path performs.

    ``prefix``: deterministic PIL transforms applied once at decode (``Resize``,
    ``CenterCrop``); ``crop``: output size of ``RandomCrop`` (None: no crop) with zero
    ``padding``; ``flip``: ``RandomHorizontalFlip(0.5)``; then ``ToTensor`` and
    ``Normalize(mean, std)``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: tuple[int, int] | None = None
    padding: int = 0
    flip: bool = False
    prefix: tuple = ()


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def image_spec(transform) -> ImageSpec | None:
    """The :class:`ImageSpec` of a ``T.Compose``, or None when the device path cannot do it.

    Accepted: ``[Resize | CenterCrop]* [RandomCrop(padding=int, constant 0 fill)]
    [RandomHorizontalFlip(0.5)] ToTensor Normalize`` — the transforms of
    :mod:`gnc.data.vision` except ImageNet's ``RandomResizedCrop``.
    """
    if transform is None:
        return None
    from torchvision import transforms as T  # a transform exists: torchvision is loaded

    steps = list(transform.transforms) if isinstance(transform, T.Compose) else []
    prefix, crop, padding, flip, norm = [], None, 0, False, None
    for i, t in enumerate(steps):
        if isinstance(t, (T.Resize, T.CenterCrop)) and crop is None and not flip:
            prefix.append(t)
        elif isinstance(t, T.RandomCrop) and crop is None and not flip:
            pad = t.padding
            if not isinstance(pad, int) or t.fill != 0 or t.padding_mode != "constant" \
                    or t.pad_if_needed:
                return None
            crop, padding = _pair(t.size), pad
        elif isinstance(t, T.RandomHorizontalFlip) and t.p == 0.5 and not flip:
            flip = True
        elif isinstance(t, T.ToTensor) and i == len(steps) - 2:
            continue
        elif isinstance(t, T.Normalize) and i == len(steps) - 1:
            norm = t
        else:
            return None
    if norm is None:
        return None
    return ImageSpec(tuple(map(float, norm.mean)), tuple(map(float, norm.std)), crop, padding,
                     flip, tuple(prefix))


# --------------------------------------------------------------------------- pixels


@dataclass
class DeviceImages:
    """One split's uint8 pixels ``(N, C, H, W)`` and labels ``(N,)``, on one device."""

    pixels: Tensor
    labels: Tensor
    spec: ImageSpec

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()


def _base_and_indices(ds: Dataset) -> tuple[Dataset, list[int] | None]:
    if isinstance(ds, Subset):
        base, idx = _base_and_indices(ds.dataset)
        sub = [int(i) for i in ds.indices]
        return base, sub if idx is None else [idx[i] for i in sub]
    return ds, None


def _array_pixels(ds) -> np.ndarray | None:
    """(N, C, H, W) uint8 of a torchvision set that keeps its images in ``.data``."""
    data = getattr(ds, "data", None)
    if data is None:
        return None
    data = data.numpy() if isinstance(data, Tensor) else np.asarray(data)
    if data.dtype != np.uint8:
        return None
    from torchvision import datasets as tvd

    if isinstance(ds, (tvd.CIFAR10,)):  # CIFAR-100 subclasses CIFAR10: (N, H, W, C)
        return data.transpose(0, 3, 1, 2)
    if isinstance(ds, tvd.MNIST):  # MNIST, FashionMNIST, EMNIST, KMNIST: (N, H, W)
        return data[:, None]
    if isinstance(ds, (tvd.SVHN, tvd.STL10)):  # (N, C, H, W)
        return data
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("GNC_CACHE_DIR") or Path.home() / ".cache" / "gnc")


def _decode(path: str, data: bytes, prefix: Sequence) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            img = im.convert("RGB")
    except UNREADABLE as err:
        raise _not_an_image(path, err) from None
    for t in prefix:
        img = t(img)
    return np.asarray(img)


def check_regular_file(path: str) -> None:
    """:class:`ImageDecodeError` unless ``path`` is a regular file (after links): opening a
    FIFO named ``*.jpg`` waited forever for a writer, and Ctrl-C could not end it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise ImageDecodeError(f"{path} cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ImageDecodeError(f"{path} is not a regular file (a pipe, device or socket)")


def load_rgb(path: str) -> Image.Image:
    """``ImageFolder``'s loader (PIL, converted to RGB), whose failure names the file: a
    JPEG cut short after an intact header passes :func:`check_image_headers` and failed
    at its first read as "image file is truncated", naming nothing."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except UNREADABLE as err:
        raise _not_an_image(path, err) from None


def header_size(path: str) -> tuple[int, int]:
    """(height, width) of the image file ``path`` from its header alone (``Image.open`` reads
    no pixels); :class:`ImageDecodeError` naming it when it is not an image."""
    check_regular_file(path)
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except UNREADABLE as err:
        raise _not_an_image(path, err) from None


_CHECKED: set[int] = set()  # hashes of file lists (with their size) checked in this process


def check_image_headers(paths: Sequence[str], size: tuple[int, int] | None = None) -> None:
    """Read the header of every image file in ``paths`` (no pixels: a few seconds for
    CIFAR-10's 60,000 JPEGs) and raise :class:`ImageDecodeError` naming the first that is not
    an image or, with ``size`` (height, width), whose size differs. A list already checked
    in this process is not read again (training loads its data twice)."""
    key = hash((tuple(paths), size))
    if key in _CHECKED:
        return
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(header_size, paths, chunksize=256))
    if size is not None:
        for path, hw in zip(paths, sizes, strict=True):
            if hw != tuple(size):
                raise ImageDecodeError(
                    f"{path} is {hw[1]}x{hw[0]} pixels, but the dataset's images are "
                    f"{size[1]}x{size[0]}: images of one dataset must share a size "
                    "(imagefolder: pass the dataset option image_size to resize them)")
    _CHECKED.add(key)


def _read(path: str) -> bytes:
    check_regular_file(path)
    with open(path, "rb") as f:
        return f.read()


def decode_files(samples: Sequence[tuple[str, int]], prefix: Sequence = (),
                 cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files as ``ImageFolder`` does: ``(N, C, H, W)`` uint8 and labels.

    The result is cached under ``$GNC_CACHE_DIR`` keyed by every file's name, label and bytes
    (and the decode prefix); a cache that cannot be read or written, or holds other images,
    is skipped with a warning.

    Raises:
        ImageDecodeError: a file that is not an image, or images of different sizes (name the
            first offender; pass the dataset option ``image_size`` to resize them).
    """
    workers = min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        blobs = list(pool.map(_read, [p for p, _ in samples], chunksize=256))
    key = hashlib.sha256(f"{CACHE_VERSION}|{prefix!r}".encode())
    for (path, label), blob in zip(samples, blobs, strict=True):
        key.update(f"|{Path(path).name}|{label}|{len(blob)}|".encode())
        key.update(blob)
    file = _cache_dir() / f"images-{key.hexdigest()[:32]}.npz"
    labels = np.asarray([y for _, y in samples], dtype=np.int64)
    if cache and file.is_file():
        try:
            with np.load(file, allow_pickle=False) as z:
                pixels = z["pixels"]
                if (np.array_equal(z["labels"], labels) and pixels.dtype == np.uint8
                        and pixels.ndim == 4 and len(pixels) == len(labels)):
                    return pixels, labels
            logger.warning("image cache %s holds other images; decoding again", file)
        except Exception as err:  # a torn or foreign file (EOFError, BadZipFile, ...): a cache
            logger.warning("image cache %s unreadable (%s: %s); decoding again", file,
                           type(err).__name__, err)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda a: _decode(*a, prefix),
                               [(p, b) for (p, _), b in zip(samples, blobs, strict=True)],
                               chunksize=256))
    del blobs
    first = arrays[0].shape if arrays else None
    for (path, _), a in zip(samples, arrays, strict=True):
        if a.shape != first:
            raise ImageDecodeError(
                f"{path} is {a.shape[1]}x{a.shape[0]} pixels, but {samples[0][0]} is "
                f"{first[1]}x{first[0]}: images of one dataset must share a size (pass the "
                "dataset option image_size to resize them)"
            )
    pixels = np.stack(arrays).transpose(0, 3, 1, 2) if arrays else np.zeros((0, 3, 1, 1),
                                                                            np.uint8)
    pixels = np.ascontiguousarray(pixels)
    if cache:
        _write_cache(file, pixels, labels)
    return pixels, labels


def _write_cache(file: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, pixels=pixels, labels=labels)
            f.flush()
            os.fsync(f.fileno())  # a crash after the rename leaves a whole file, not a torn one
        os.replace(tmp, file)
    except OSError as err:
        logger.warning("could not write the image cache %s (%s); the next run decodes again",
                       file, err)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _is_image_folder(ds: Dataset) -> bool:
    from torchvision import datasets as tvd

    return isinstance(ds, tvd.DatasetFolder)


def device_images(ds: Dataset, device: torch.device | str, *, cache: bool = True
                  ) -> DeviceImages | None:
    """A split's pixels on ``device``, or None when its transform or storage is unsupported.

    A :class:`~gnc.data.perturb.RelabelledDataset` (label noise) gives its own labels, not
    those stored with the pixels.
    """
    relabelled = None
    if isinstance(ds, RelabelledDataset):
        ds, relabelled = ds.dataset, ds.targets
    base, idx = _base_and_indices(ds)
    spec = image_spec(getattr(base, "transform", None))
    if spec is None:
        return None
    arr = _array_pixels(base) if not spec.prefix else None
    if arr is not None:
        labels = as_long(getattr(base, "targets", None) if hasattr(base, "targets")
                         else base.labels).numpy()
        if idx is not None:
            arr, labels = arr[idx], labels[idx]
    elif _is_image_folder(base):
        samples = base.samples if idx is None else [base.samples[i] for i in idx]
        arr, labels = decode_files(samples, spec.prefix, cache=cache)
    else:
        return None
    if relabelled is not None:
        labels = relabelled.numpy()
    pixels = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return DeviceImages(pixels, torch.as_tensor(labels, dtype=torch.long).to(device), spec)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """``auto``: a CUDA device whose memory holds ``nbytes`` within :data:`AUTO_MAX_SHARE`."""
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return nbytes <= AUTO_MAX_SHARE * total


def estimated_bytes(bundle: DatasetBundle) -> int:
    """Pixels of both splits as uint8 (from ``in_shape``)."""
    n = len(bundle.train) + (len(bundle.test) if bundle.test is not None else 0)
    return n * int(np.prod(bundle.in_shape))


# --------------------------------------------------------------------------- augmentation


def crop_flip(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, size: tuple[int, int],
              padding: int) -> Tensor:
    """Zero-pad by ``padding``, crop ``size`` at offsets ``(oy, ox)``, flip where ``flip``.

    One gather for the whole batch: output pixel (i, j) of image b is padded pixel
    ``(oy_b + i, ox_b + j)``, or ``(oy_b + i, ox_b + w − 1 − j)`` when flipped (crop, then
    flip, as ``RandomCrop`` followed by ``RandomHorizontalFlip``). Returns ``(B, C, h, w)``
    in channels-last memory layout.
    """
    h, w = size
    xp = F.pad(x, (padding,) * 4) if padding else x
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    rows = oy[:, None] + r  # (B, h)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - c, c)  # (B, w)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return xp[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B,h,w,C)→


class DeviceImageLoader:
    """Batches ``(x, y)`` of a :class:`DeviceImages` split, in a batch sampler's order.

    Works like a :func:`~gnc.data.make_loader` loader (``len``, iteration,
    :func:`~gnc.data.set_loader_epoch`): the sampler gives the indices, ``generator`` (reseeded
    per epoch by ``set_loader_epoch``) the crops and flips when ``augment``.

    Args:
        images: the split's pixels and labels on the device.
        batch_sampler: yields lists of indices (its ``set_epoch`` selects the order).
        augment: apply the spec's random crop and flip.
        channels_last: return ``x`` in channels-last memory layout.
        seed: seeds ``generator`` until the first ``set_loader_epoch``.
    """

    def __init__(self, images: DeviceImages, batch_sampler, *, augment: bool,
                 channels_last: bool = False, seed: int = 0) -> None:
        self.images, self.batch_sampler = images, batch_sampler
        self.sampler = getattr(batch_sampler, "sampler", batch_sampler)
        self.augment = augment and (images.spec.crop is not None or images.spec.flip)
        self.channels_last = channels_last
        self.generator = torch.Generator().manual_seed(seed)
        dev, spec = images.pixels.device, images.spec
        shape = (1, -1, 1, 1)
        self._mean = torch.tensor(spec.mean, device=dev).view(shape)
        self._std = torch.tensor(spec.std, device=dev).view(shape)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _draws(self, n: int) -> Tensor:
        """(3, n) int64 on the device: crop offsets (y, x) and flips for n positions."""
        spec, (_, _, H, W) = self.images.spec, self.images.pixels.shape
        h, w = spec.crop or (H, W)
        g = self.generator
        oy = torch.randint(0, H + 2 * spec.padding - h + 1, (n,), generator=g)
        ox = torch.randint(0, W + 2 * spec.padding - w + 1, (n,), generator=g)
        flip = (torch.randint(0, 2, (n,), generator=g) if spec.flip
                else torch.zeros(n, dtype=torch.long))
        return torch.stack([oy, ox, flip])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = [torch.as_tensor(b, dtype=torch.long) for b in self.batch_sampler]
        if not batches:
            return
        sizes = [len(b) for b in batches]
        plan = torch.cat(batches)[None]
        if self.augment:
            plan = torch.cat([plan, self._draws(plan.shape[1])])
        dev = self.images.pixels.device
        if dev.type == "cuda":
            plan = plan.pin_memory()
        plan = plan.to(dev, non_blocking=True)  # one copy per epoch, no per-step sync
        start = 0
        for n in sizes:
            yield self._batch(plan[:, start:start + n])
            start += n

    def _batch(self, plan: Tensor) -> tuple[Tensor, Tensor]:
        idx = plan[0]
        x = self.images.pixels[idx]
        if self.augment:
            spec = self.images.spec
            size = spec.crop or tuple(x.shape[-2:])
            x = crop_flip(x, plan[1], plan[2], plan[3].bool(), size, spec.padding)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        # ToTensor then Normalize, the same operations in the same order
        x = x.float().div_(255).sub_(self._mean).div_(self._std)
        return x, self.images.labels[idx]
