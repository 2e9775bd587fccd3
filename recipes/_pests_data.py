"""Images for the pests recipe: loaders (packaged digits, IP102 folders or lists) and the batched,
seeded augmentation.

Augmentation runs on a whole batch at once (one affine_grid/grid_sample call, vectorised colour
jitter); only the per-sample random draws loop in Python. The draws come from
rng(seed, epoch, sample index), so a sample is augmented the same way whatever the world size,
rank, worker or resume point (pitfall 10).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distrain import ConfigError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def load_digits_images(size: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """scikit-learn's 1,797 8x8 digit scans (values 0-16), resized to size x size, split 70/15/15
    by a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] * (255 / 16)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
    y = torch.from_numpy(d.target).long()
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    n_val = n_test = int(0.15 * len(x))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {k: (x[i], y[i]) for k, i in parts.items()}, [str(c) for c in d.target_names]


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            a = np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    except OSError as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def scan_folders(root: Path) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """`<root>/<split>/<class>/*.jpg` for split in train, val, test (test optional); classes from train."""
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ConfigError(f"data.path={root} needs train/ and val/ folders of <class>/<image> (IP102 folder layout)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    out = {}
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        paths, labels = [], []
        for p in sorted((root / split).glob("*/*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.parent.name not in classes:
                raise ConfigError(f"data.path={root}: class {p.parent.name!r} of {split}/ is not among train/ classes")
            paths.append(p)
            labels.append(classes.index(p.parent.name))
        out[split] = (paths, labels)
    return out, classes


def scan_lists(root: Path, image_dir: str) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """IP102 lists: `<root>/{train,val,test}.txt` with lines `<image> <label>`, images under `<root>/<image_dir>/`;
    class names from `<root>/classes.txt` (one per line, optional)."""
    out, top = {}, -1
    for split in ("train", "val", "test"):
        f = root / f"{split}.txt"
        if not f.is_file():
            if split == "test":
                continue
            raise ConfigError(f"data.path={root} lacks {split}.txt (lines '<image> <label>', IP102 list layout)")
        paths, labels = [], []
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ConfigError(f"{f}:{n}: expected '<image> <label>', got {line!r}")
            paths.append(root / image_dir / parts[0])
            labels.append(int(parts[1]))
        top = max(top, *labels) if labels else top
        out[split] = (paths, labels)
    names_file = root / "classes.txt"
    names = [s.strip() for s in names_file.read_text().splitlines() if s.strip()] if names_file.is_file() else []
    return out, names if len(names) > top else [str(i) for i in range(top + 1)]


class ImageSet(Dataset):
    """uint8 images held in memory (`images`) or decoded per batch from `paths`; batches come out as
    normalised float tensors, augmented when `augment` is set."""

    def __init__(
        self,
        labels: torch.Tensor,
        images: torch.Tensor | None = None,
        paths: list[Path] | None = None,
        size: int = 32,
        channels: int = 3,
        aug: dict | None = None,
        seed: int = 0,
        mean: torch.Tensor = torch.zeros(1),
        std: torch.Tensor = torch.ones(1),
    ):
        self.labels, self.images, self.paths = labels, images, paths
        self.size, self.channels, self.aug, self.seed = size, channels, aug, seed
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.images is not None:
            x = self.images[idx].float()
        else:
            x = torch.from_numpy(
                np.stack([read_image(self.paths[i], self.size, self.channels) for i in idx.tolist()])
            ).float()
        if self.aug:
            x = augment(x, idx.tolist(), getattr(indices, "epoch", 0), self.seed, self.aug)
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return {"x": x, "y": self.labels[idx]}


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective hash of uint64 counters (wrapping arithmetic on arrays)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, epoch: int, indices: np.ndarray, n: int) -> np.ndarray:
    """(len(indices), n) uniforms in [0, 1), a pure function of (seed, epoch, sample index): counter-based,
    vectorised (a numpy Generator per sample costs ~0.3 ms, more than the augmentation itself)."""
    key = _mix(_mix(np.array([seed], dtype=np.uint64)) ^ np.array([epoch], dtype=np.uint64))
    counters = indices.astype(np.uint64)[:, None] * np.uint64(n) + np.arange(n, dtype=np.uint64)
    return (_mix(counters ^ _mix(key)) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def augment(x: torch.Tensor, indices: list[int], epoch: int, seed: int, aug: dict) -> torch.Tensor:
    """Random crop (a shift of up to `crop_pad` pixels), flip, rotation, colour jitter on (B, C, H, W) in 0..255."""
    _b, c, h, w = x.shape
    draws = uniform(seed, epoch, np.asarray(indices), 7)
    angle = torch.from_numpy((2 * draws[:, 0] - 1) * math.radians(aug["rotation"])).float()
    flip = torch.from_numpy(np.where((draws[:, 1] < 0.5) & aug["hflip"], -1.0, 1.0)).float()
    shift = torch.from_numpy((2 * draws[:, 2:4] - 1) * 2 * aug["crop_pad"] / np.array([w, h])).float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if c == 3 and aug["jitter"] > 0:  # brightness, contrast, saturation factors in [1 - j, 1 + j]
        f = torch.from_numpy(1 + (2 * draws[:, 4:7] - 1) * aug["jitter"]).float()[:, :, None, None, None]
        x = x * f[:, 0]
        x = (x - x.mean((1, 2, 3), keepdim=True)) * f[:, 1] + x.mean((1, 2, 3), keepdim=True)
        grey = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        x = (x - grey) * f[:, 2] + grey
    return x.clamp(0, 255)
