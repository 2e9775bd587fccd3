"""Image classification with a small ResNet (the IP102 pest-image pipeline), augmented on the fly.

Default data: scikit-learn's digits (1,797 8x8 greyscale scans, 10 classes), resized to
`data.image_size` and split 70/15/15 by a fixed permutation. `data.source=folders` reads IP102
folders (`<path>/{train,val,test}/<class>/*.jpg`), `data.source=lists` IP102's image lists
(`<path>/{train,val,test}.txt` of `<image> <label>` lines, images in `<path>/images/`), decoded
with Pillow at `data.image_size` (held in memory, or per batch with `data.preload=false`).
Training batches get a random crop (a shift of up to `data.crop_pad` pixels), flip, rotation and
colour jitter (RGB), seeded per sample and epoch. The network uses GroupNorm rather than
BatchNorm so each sample's loss does not depend on which others share its micro-batch (the
gradient stays the same under any accumulation or world size). `model.pretrained=<weights>`
loads a backbone (a head whose shape differs is left fresh); `model.freeze_backbone=true`
trains only the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distrain import ConfigError, Splits, StepOutput, opt
from distrain import DataConfig as BaseDataConfig
from distrain.observe.classification import classification_metrics, save_confusion
from distrain.recipes._pests_data import ImageSet, load_digits_images, read_image, scan_folders, scan_lists


@dataclass
class ModelConfig:
    width: int = opt(16, "channels of the first stage (doubled at each later stage)")
    blocks: list[int] = opt([1, 1, 1], "residual blocks per stage; stages after the first halve the resolution")
    dropout: float = opt(0.0, "dropout before the classifier")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    pretrained: str | None = opt(
        None, "safetensors weights to start from (e.g. a previous run's model.safetensors)", must_exist=True
    )
    freeze_backbone: bool = opt(False, "train only the classification head (needs model.pretrained)")


@dataclass
class DataConfig(BaseDataConfig):
    source: Literal["digits", "folders", "lists"] = opt(
        "digits", "digits: packaged default; folders / lists: IP102 layouts"
    )
    path: str | None = opt(None, "IP102 root folder (source=folders|lists)", must_exist=True)
    image_dir: str = opt("images", "folder of the images named in the lists (source=lists)")
    image_size: int = opt(16, "images are resized to image_size x image_size")
    channels: Literal[1, 3] = opt(3, "colour channels read from image files (the digits are greyscale)")
    preload: bool = opt(True, "decode every image once into memory; false decodes per batch (use data.num_workers)")
    crop_pad: int = opt(2, "random crop: shift by up to this many pixels (0 disables)")
    hflip: bool = opt(False, "random horizontal flips (off for digits, on for insects)")
    rotation: float = opt(10.0, "random rotation range in degrees (+-)")
    jitter: float = opt(0.2, "colour jitter strength for RGB: brightness, contrast, saturation in 1 +- jitter")


def validate(cfg) -> None:
    if cfg.data.source != "digits" and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path=<IP102 root folder>")
    if cfg.model.freeze_backbone and not cfg.model.pretrained:
        raise ConfigError("model.freeze_backbone=true needs model.pretrained=<weights.safetensors>")
    if cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is out of range; allowed: an integer >= 8")


def load_images(source: str, path: str | None, image_dir: str, size: int, channels: int, preload: bool):
    """Per split (uint8 images or None, paths or None, labels), class names, channel count."""
    if source == "digits":
        parts, classes = load_digits_images(size)
        return {k: (x, None, y) for k, (x, y) in parts.items()}, classes, 1
    root = Path(path)  # type: ignore[arg-type]
    found, classes = scan_folders(root) if source == "folders" else scan_lists(root, image_dir)
    out = {}
    for split, (paths, labels) in found.items():
        if preload:
            images = torch.stack([torch.from_numpy(read_image(p, size, channels)) for p in paths])
            out[split] = (images, None, torch.tensor(labels))
        else:
            out[split] = (None, paths, torch.tensor(labels))
    return out, classes, channels


def _images(cfg):
    d = cfg.data
    return load_images(d.source, d.path, d.image_dir, d.image_size, d.channels, d.preload)


def build_datasets(cfg) -> Splits:
    parts, classes, channels = _images(cfg)
    d = cfg.data
    aug = {"crop_pad": d.crop_pad, "hflip": d.hflip, "rotation": d.rotation, "jitter": d.jitter}
    train_images, paths = parts["train"][0], parts["train"][1]
    if train_images is None:  # decoded per batch: channel statistics from the first 256 training images
        train_images = torch.stack([torch.from_numpy(read_image(p, d.image_size, channels)) for p in paths[:256]])
    mean, std = train_images.float().mean((0, 2, 3)), train_images.float().std((0, 2, 3)) + 1e-3
    sets = {
        k: ImageSet(y, x, paths, d.image_size, channels, aug if k == "train" else None, cfg.train.seed, mean, std)
        for k, (x, paths, y) in parts.items()
    }
    return Splits(train=sets["train"], val=sets["val"], test=sets.get("test"),
                  info={"classes": classes, "channels": channels})


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.conv2, self.n2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout)
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, channels: int, classes: int, m: ModelConfig):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, m.width, 3, 1, 1, bias=False), norm(m.width), nn.ReLU())
        layers, cin = [], m.width
        for stage, n in enumerate(m.blocks):
            cout = m.width * 2**stage
            layers += [BasicBlock(cin if i == 0 else cout, cout, 2 if stage > 0 and i == 0 else 1) for i in range(n)]
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(m.dropout), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


SHARD_BLOCKS = ("BasicBlock",)


def build_model(cfg, info: dict) -> nn.Module:
    model = ResNet(info["channels"], len(info["classes"]), cfg.model)
    if cfg.model.pretrained:
        from distrain.checkpoint.weights import load_weights

        state, own = load_weights(cfg.model.pretrained), model.state_dict()
        backbone = {k for k in own if not k.startswith("head.")}
        missing, unexpected = sorted(backbone - set(state)), sorted(k for k in state if k not in own)
        bad = [k for k in backbone & set(state) if state[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ConfigError(
                f"model.pretrained={cfg.model.pretrained} does not fit this model (model.width/blocks?): "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad[:3]}"
            )
        keep = {k: v for k, v in state.items() if k in backbone or v.shape == own[k].shape}
        model.load_state_dict(keep, strict=False)
    if cfg.model.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    return model


def step(cfg, info: dict, model: nn.Module, batch: dict) -> StepOutput:
    logits = model(batch["x"]).float()
    loss = F.cross_entropy(logits, batch["y"], reduction="none", label_smoothing=cfg.model.label_smoothing)
    return StepOutput(loss=loss, preds=logits.argmax(-1), targets=batch["y"])


def metrics(cfg, info: dict, preds: torch.Tensor, targets: torch.Tensor) -> dict:
    return classification_metrics(preds, targets, num_classes=len(info["classes"]))


def report(cfg, info: dict, run_dir: Path, split: str, preds: torch.Tensor, targets: torch.Tensor) -> None:
    classes = info["classes"]
    save_confusion(run_dir, split, classification_metrics(preds, targets, len(classes))["confusion_matrix"], classes)
