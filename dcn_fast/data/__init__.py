"""CIFAR-10 for dcn_fast: loading from several layouts, a shipped sample, on-device augmentation.

Sources accepted by :func:`load_cifar10` (``root``):

- ``None``: the sample shipped in the package (200 train + 50 test images per
  class, taken from the JPEG release; ``cifar10-sample.tar.xz``);
- torchvision's layout: a folder holding ``cifar-10-batches-py/`` (or that
  folder itself); downloaded there first with ``download=True`` when online;
- the JPEG release: ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, as a
  folder or a ``.tar.xz`` / ``.tar.gz`` / ``.tar`` archive (or a folder holding
  ``cifar10-jpeg.tar.xz``). JPEGs are decoded once into a uint8 cache
  (``$DCN_FAST_CACHE``, default ``~/.cache/dcn_fast``).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CLASSES",
    "CIFAR10",
    "load_cifar10",
    "sample_archive",
    "per_class_subset",
    "normalize",
    "to_inputs",
    "augment",
]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
_ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")


@dataclass
class CIFAR10:
    """Images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` of both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def sample_archive() -> Path:
    """The CIFAR-10 sample shipped with the package."""
    return Path(__file__).resolve().parent / "cifar10-sample.tar.xz"


def _cache_dir() -> Path:
    return Path(os.environ.get("DCN_FAST_CACHE", Path.home() / ".cache" / "dcn_fast"))


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _split_and_class(name: str) -> tuple[str, int] | None:
    parts = Path(name).parts
    if len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
        return None
    split, cls = parts[-3], parts[-2]
    if split not in ("train", "test") or cls not in CLASSES:
        return None
    return split, CLASSES.index(cls)


def _jpeg_entries(path: Path):
    """(name, bytes) of every image file of a JPEG tree or archive."""
    if path.is_dir():
        for file in path.rglob("*"):
            if file.is_file() and _split_and_class(str(file.relative_to(path))):
                yield str(file.relative_to(path)), file.read_bytes()
        return
    # Streamed in archive order: random access into a compressed tar restarts
    # decompression for every member. Callers sort by name.
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            if member.isfile() and _split_and_class(member.name):
                yield member.name, archive.extractfile(member).read()


def _fingerprint(path: Path) -> str:
    """Key of the decoded cache: the archive's size and mtime, or for a folder the
    relative path, size and mtime of every image in it (so adding, changing or
    deleting an image or a whole class folder makes a new key)."""
    digest = hashlib.sha1(str(path.resolve()).encode())
    if path.is_dir():
        files = sorted(
            (str(file.relative_to(path)), file.stat())
            for file in path.rglob("*")
            if file.is_file() and _split_and_class(str(file.relative_to(path)))
        )
        for name, stat in files:
            digest.update(f"\n{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        stat = path.stat()
        digest.update(f":{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _decode_tree(path: Path) -> dict[str, np.ndarray]:
    images = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    for name, data in sorted(_jpeg_entries(path)):
        split, label = _split_and_class(name)
        images[split].append(_decode(data))
        labels[split].append(label)
    if not images["train"] or not images["test"]:
        raise FileNotFoundError(f"{path} holds no train/<class>/*.jpg and test/<class>/*.jpg images")
    arrays = {}
    for split in ("train", "test"):
        arrays[f"{split}_images"] = np.stack(images[split]).transpose(0, 3, 1, 2).copy()
        arrays[f"{split}_labels"] = np.asarray(labels[split], dtype=np.int64)
    return arrays


def _load_jpeg(path: Path) -> dict[str, np.ndarray]:
    cache = _cache_dir() / f"cifar10-{_fingerprint(path)}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return dict(data)
    try:
        arrays = _decode_tree(path)
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path} is not a readable CIFAR-10 JPEG tree or archive ({type(exc).__name__}: {reason})") from exc
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, **arrays)
    os.replace(partial, cache)  # atomic: a crash leaves no half-written cache
    return arrays


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's python batches (dicts, lists, bytes and numpy arrays) and nothing
    else: a batch file that names any other callable is refused instead of run."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _load_pickles(folder: Path) -> dict[str, np.ndarray]:
    def read(names):
        images, labels = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    batch = _ArrayUnpickler(f, encoding="latin1").load()
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch["labels"])
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ValueError(f"{folder / name} is not a CIFAR-10 python batch ({type(exc).__name__}: {reason})") from exc
        return np.concatenate(images), np.asarray(labels, dtype=np.int64)

    train = read([f"data_batch_{i}" for i in range(1, 6)])
    test = read(["test_batch"])
    return {"train_images": train[0], "train_labels": train[1], "test_images": test[0], "test_labels": test[1]}


def _find(root: Path) -> tuple[str, Path] | None:
    if root.is_file() and root.name.endswith(_ARCHIVE_SUFFIXES):
        return "jpeg", root
    if not root.is_dir():
        return None
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return "pickle", folder
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "jpeg", root
    for name in ("cifar10-jpeg.tar.xz", "cifar10-sample.tar.xz"):
        if (root / name).is_file():
            return "jpeg", root / name
    return None


def load_cifar10(root: str | os.PathLike | None = None, *, download: bool = False) -> CIFAR10:
    """Load both splits of CIFAR-10 from ``root`` (see the module docstring).

    Raises:
        FileNotFoundError: naming what was looked for, if ``root`` holds no CIFAR-10.
        ValueError: if the files found are not readable CIFAR-10 (a truncated or
            corrupted archive, an image that does not decode, a foreign pickle) or
            a split lacks a class.
    """
    if root is None:
        kind, path = "jpeg", sample_archive()
    else:
        root = Path(root).expanduser()
        found = _find(root)
        if found is None and download:
            try:
                import torchvision
            except ImportError as exc:
                raise FileNotFoundError(f"no CIFAR-10 under {root}, and downloading needs torchvision") from exc
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
            found = _find(root)
        if found is None:
            raise FileNotFoundError(
                f"no CIFAR-10 under {root}: looked for torchvision's cifar-10-batches-py/ (data_batch_1..5, "
                "test_batch), a JPEG tree train/<class>/*.jpg + test/<class>/*.jpg, or a .tar.xz/.tar.gz/.tar "
                "archive of one (e.g. cifar10-jpeg.tar.xz)"
            )
        kind, path = found
    arrays = _load_jpeg(path) if kind == "jpeg" else _load_pickles(path)
    for split in ("train", "test"):
        # A 10-way classifier trained or tested without a class gives numbers that look
        # plausible and mean something else: refuse rather than train silently.
        missing = [CLASSES[c] for c in range(len(CLASSES)) if not (arrays[f"{split}_labels"] == c).any()]
        if missing:
            raise ValueError(f"{path} has no {split} images of class{'es' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)}: every class of CIFAR-10 needs images in {split}/<class>/")
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return CIFAR10(**tensors, source=str(path))


def per_class_subset(labels: torch.Tensor, images_per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``images_per_class`` images of every class, drawn with ``seed`` (Table 2 protocol)."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for cls in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == cls).flatten()
        if members.numel() < images_per_class:
            raise ValueError(
                f"images_per_class={images_per_class} but class {CLASSES[cls]!r} has only {members.numel()} images"
            )
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:images_per_class]])
    return torch.cat(picked).sort().values


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → float32, standardised with the CIFAR-10 channel statistics."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def to_inputs(images: torch.Tensor, standardize: bool = False) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → the float32 model input: in [0, 1] as the official
    code feeds it (``ToTensor()``), or standardised by :func:`normalize` when ``standardize``."""
    return normalize(images) if standardize else images.float() / 255.0


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random translation by up to ±``shift`` px (zero pad, then crop) and horizontal flip,
    for a whole batch at once on its device. ``generator`` (on the batch's device) fixes the draw."""
    batch, _, height, width = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * shift + 1, (2, batch), generator=generator, device=device)
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift))
    rows = offsets[0, :, None] + torch.arange(height, device=device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(width, device=device)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = torch.arange(batch, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
