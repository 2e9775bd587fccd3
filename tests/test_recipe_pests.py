"""pests recipe: IP102 folder/list loaders, seeded batched augmentation, pretrained + frozen backbone,
batch_size=auto, linear lr scaling, and a 2-process run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.errors import ConfigError
from distrain.recipe import resolve_config
from distrain.train.data import BatchIndices
from distrain.train.trainer import Trainer

from helpers import run_distrain, weights

CLASSES = ["aphid", "locust", "mite"]
COLOURS = {"aphid": (200, 40, 40), "locust": (40, 200, 40), "mite": (40, 40, 200)}


def write_ip102(root, per_class=(6, 2, 2)):
    """Folders <root>/<split>/<class>/*.jpg and the same images as IP102 lists (images/ + split.txt)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lists = {}
    for split, n in zip(("train", "val", "test"), per_class):
        lists[split] = []
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, size=(20, 24, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(a)
                img.save(root / split / name / f"{i}.png")
                img.save(root / "images" / f"{split}_{name}_{i}.png")
                lists[split].append(f"{split}_{name}_{i}.png {label}")
        (root / f"{split}.txt").write_text("\n".join(lists[split]) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def test_folder_and_list_loaders_agree(tmp_path):
    write_ip102(tmp_path)
    common = [
        "recipe=pests",
        f"data.path={tmp_path}",
        "data.image_size=12",
        "data.crop_pad=0",
        "data.rotation=0",
        "data.jitter=0",
    ]
    cfg_f, rec_f = resolve_config([*common, "data.source=folders"])
    cfg_l, rec_l = resolve_config([*common, "data.source=lists"])
    parts_f, classes_f, _ = rec_f.module._images(cfg_f)
    parts_l, classes_l, _ = rec_l.module._images(cfg_l)
    assert classes_f == classes_l == CLASSES
    for split in ("train", "val", "test"):
        xf, _, yf = parts_f[split]
        _xl, _, yl = parts_l[split]
        assert xf.shape == (len(yf), 3, 12, 12) and xf.dtype == torch.uint8
        assert sorted(yf.tolist()) == sorted(yl.tolist())
    # a pixel's colour tells the class: reference = the colour each class was drawn with
    xf, _, yf = parts_f["train"]
    mean_rgb = xf.float().mean((2, 3))
    assert (mean_rgb.argmax(1) == yf).all()
    # lazy decoding gives the same pixels as preloading
    cfg_z, rec_z = resolve_config([*common, "data.source=folders", "data.preload=false"])
    lazy = rec_z.build_datasets(cfg_z).train.__getitems__([0, 5])
    eager = rec_f.build_datasets(cfg_f).train.__getitems__([0, 5])
    torch.testing.assert_close(lazy["x"], eager["x"])
    (tmp_path / "val.txt").write_text("broken line here\n")
    with pytest.raises(ConfigError, match=r"val.txt:1: expected '<image> <label>'"):
        resolve_config([*common, "data.source=lists", "data.image_size=13"])[1].build_datasets(
            resolve_config([*common, "data.source=lists", "data.image_size=13"])[0]
        )


def test_augmentation_is_per_sample_and_epoch():
    cfg, recipe = resolve_config(["recipe=pests", "data.hflip=true"])
    train = recipe.build_datasets(cfg).train

    def batch(indices, epoch):
        b = BatchIndices(indices)
        b.epoch = epoch
        return train.__getitems__(b)["x"]

    together = batch([3, 8, 21], epoch=2)
    alone = batch([8], epoch=2)
    torch.testing.assert_close(together[1], alone[0])  # independent of batch composition (and so of rank)
    assert not torch.allclose(batch([8], epoch=3), alone)  # a new epoch draws new augmentations
    plain = recipe.build_datasets(cfg).val
    torch.testing.assert_close(plain.__getitems__([4])["x"], plain.__getitems__(BatchIndices([4]))["x"])
    assert torch.isfinite(together).all()


def test_pretrained_frozen_backbone_trains_only_the_head(tmp_path):
    tiny = [
        "recipe=pests",
        "model.width=4",
        "model.blocks=[1,1]",
        "log.progress=false",
        "train.max_steps=3",
        "data.batch_size=32",
        "ckpt.save_best=false",
        "ckpt.save_final=false",
    ]
    cfg, recipe = resolve_config([*tiny, f"output_dir={tmp_path / 'a'}"])
    Trainer(cfg, recipe).train()
    first = weights(tmp_path / "a")
    cfg, recipe = resolve_config(
        [
            *tiny,
            f"output_dir={tmp_path / 'b'}",
            "train.seed=5",
            f"model.pretrained={tmp_path / 'a' / 'model.safetensors'}",
            "model.freeze_backbone=true",
        ]
    )
    trainer = Trainer(cfg, recipe)
    assert "trainable" in trainer.plan_text()
    trainer.train()
    second = weights(tmp_path / "b")
    for k, v in first.items():
        if k.startswith("head."):
            assert not torch.equal(v, second[k]), k  # the head trained
        else:
            torch.testing.assert_close(v, second[k], rtol=0, atol=0)  # loaded, then frozen
    with pytest.raises(ConfigError, match="does not fit this model"):
        cfg, recipe = resolve_config(
            [*tiny, "model.width=8", f"model.pretrained={tmp_path / 'a' / 'model.safetensors'}"]
        )
        recipe.bind(cfg, recipe.load_datasets(cfg).info).build_model()
    with pytest.raises(ConfigError, match=r"model\.freeze_backbone=true needs model\.pretrained"):
        resolve_config([*tiny, "model.freeze_backbone=true"])


def test_auto_batch_keeps_global_batch_and_linear_lr(tmp_path):
    cfg, recipe = resolve_config(
        [
            "recipe=pests",
            "data.batch_size=auto",
            "data.global_batch=64",
            "data.auto_memory_mb=6",
            "optim.scale_lr=linear",
            "optim.base_batch=32",
            "optim.lr=1e-3",
            f"output_dir={tmp_path}",
        ]
    )
    t = Trainer(cfg, recipe)
    assert t.plan.micro_batch < 64 and t.plan.micro_batch * t.plan.grad_accum == 64
    assert t.lr == pytest.approx(1e-3 * 64 / 32)


@pytest.mark.multiproc
def test_pests_ddp_on_ip102_folders(tmp_path):
    write_ip102(tmp_path / "ip102")
    out = tmp_path / "run"
    run_distrain(
        [
            "recipe=pests",
            "data.source=folders",
            f"data.path={tmp_path / 'ip102'}",
            "data.image_size=12",
            "data.hflip=true",
            "data.batch_size=3",
            "model.width=8",
            "train.max_epochs=6",
            "train.patience=0",
            "optim.lr=1e-2",
            "log.progress=false",
            f"output_dir={out}",
        ],
        launch_config="cpu_ddp",
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 18
    assert s["test"]["accuracy"] >= 2 / 3  # three colour-coded classes
    cm = json.loads((out / "confusion_test.json").read_text())
    assert cm["labels"] == CLASSES and sum(map(sum, cm["matrix"])) == 6
    assert len(s["test"]["per_class_accuracy"]) == 3
