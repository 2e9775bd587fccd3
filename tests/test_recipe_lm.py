"""lm recipe: token files split by document and cached atomically, packing boundaries, the baselines
against a hand count, a short default run that learns, exact resume, strict export, and FSDP2."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import distrain
from distrain.checkpoint.export import export
from distrain.errors import ConfigError
from distrain.lm.packing import num_rows, rows, segments, write_documents
from distrain.recipe import resolve_config
from distrain.train.trainer import Trainer

from helpers import metrics_rows, run_distrain, train_losses

EOD = 256
TINY = ["recipe=lm", "model.width=64", "model.depth=1", "model.heads=2", "log.progress=false", "log.every=1"]
SMALL_EVAL = ["data.val_fraction=0.01", "data.test_fraction=0.01"]  # about 1% of the files each: quick evaluations
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def write_corpus(root: Path, n: int = 40) -> list[str]:
    """n real files (the standard library's smallest non-empty modules, under fixed names, so the hash
    split is the same on every Python) and files the corpus skips; returns the corpus's relative paths."""
    sources = sorted((p for p in STDLIB.glob("*.py") if p.stat().st_size > 200),
                     key=lambda p: (p.stat().st_size, p.name))  # fmt: skip
    names = []
    for i, src in enumerate(sources[:n]):
        rel = f"pkg{i % 3}/mod_{i:02d}.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
        names.append(rel)
    for skipped in ("tests/test_a.py", "site-packages/x/y.py", "pkg0/__pycache__/c.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("print('not part of the corpus')\n")
    (root / "notes.txt").write_text("not a .py file\n")
    return sorted(names)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    return root, write_corpus(root)


def built(args: list[str]):
    cfg, recipe = resolve_config(args)
    return cfg, recipe, recipe.load_datasets(cfg)


def split_by_hand(rel: str, val: float, test: float) -> str:
    u = int(hashlib.sha256(f"split\0{rel}".encode()).hexdigest()[:15], 16) / 16**15
    return "test" if u < test else "val" if u < test + val else "train"


def test_token_files_split_by_document_and_round_trip(corpus, tmp_path):
    root, names = corpus
    args = ["recipe=lm", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.15",
            "data.test_fraction=0.15", "data.block_size=16"]  # fmt: skip
    splits = built(args)[2]
    folder = Path(splits.info["cache"])
    meta = json.loads((folder / "meta.json").read_text())
    docs = meta["documents"]
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == names  # every file once, the skipped ones out
    for split, rels in docs.items():
        assert rels and all(split_by_hand(r, 0.15, 0.15) == split for r in rels), split
    assert meta["file_count"] == len(names) and meta["python"] and splits.info["files"] == meta["files"]
    for split in ("train", "val", "test"):  # the token file is the files' bytes, each followed by EOD
        tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
        want = b"".join((root / r).read_bytes() + b"\0" for r in docs[split])
        assert len(tokens) == len(want) == meta["tokens"][split]
        assert np.array_equal(tokens == EOD, np.frombuffer(want, np.uint8) == 0)  # sources hold no NUL byte
        assert bytes(np.where(tokens == EOD, 0, tokens).astype(np.uint8)) == want
        assert len(getattr(splits, split)) == (len(tokens) - 1) // 16
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left

    stamp = (folder / "meta.json").stat().st_mtime_ns  # the same inputs: the cache is read, not rewritten
    assert built(args)[2].info["cache"] == str(folder) and (folder / "meta.json").stat().st_mtime_ns == stamp
    (root / names[0]).write_text((root / names[0]).read_text() + "# changed\n")
    assert built(args)[2].info["cache"] != str(folder)
    # a file's split does not depend on the others: fewer files, the same split for each
    (root / names[1]).unlink()
    smaller = json.loads((Path(built(args)[2].info["cache"]) / "meta.json").read_text())["documents"]
    assert all(r in docs[s] for s, rels in smaller.items() for r in rels)


def test_too_few_files_is_one_config_error(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root, n=2)
    with pytest.raises(ConfigError, match=r"data.root=.*2 \*.py files leave the .* split empty"):
        built(["recipe=lm", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "cache" / "lm").exists() or not any((tmp_path / "cache" / "lm").iterdir())
    with pytest.raises(ConfigError, match=r"data\.val_fraction=0\.6"):
        resolve_config(["recipe=lm", "data.val_fraction=0.6", "data.test_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"model\.width=30 must be a positive multiple of model\.heads=4"):
        resolve_config(["recipe=lm", "model.width=30"])


def test_packing_rows_and_document_boundaries(tmp_path):
    import io

    buf = io.BytesIO()
    assert write_documents([np.array([5, 6]), np.array([7]), np.array([8, 9, 10])], EOD, buf) == [3, 2, 4]
    stream = np.frombuffer(buf.getvalue(), dtype=np.uint16)
    assert stream.tolist() == [5, 6, EOD, 7, EOD, 8, 9, 10, EOD]
    assert num_rows(len(stream), 4) == 2 and num_rows(len(stream), 3) == 2 and num_rows(1, 3) == 0
    r = rows(stream, np.array([1, 0]), 4)  # rows of block + 1 tokens, sharing one token
    assert r.tolist() == [[EOD, 8, 9, 10, EOD], [5, 6, EOD, 7, EOD]]
    doc, pos = segments(np.array([[5, EOD, 7, 8, EOD, 9], [EOD, EOD, 1, 2, 3, 4]]), EOD)
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="end-of-document token"):
        write_documents([np.array([1, EOD])], EOD, io.BytesIO())

    # The model sees the boundaries: with doc_mask, a token of the second document is blind to the first.
    for doc_mask in (True, False):
        cfg, recipe = resolve_config([*TINY, f"model.doc_mask={doc_mask}"])
        torch.manual_seed(0)
        model = recipe.bind(cfg, {"vocab": 257, "eod": EOD, "block_size": 8}).build_model().eval()
        a = torch.tensor([[1, 2, 3, EOD, 4, 5, 6, 7]])
        b = a.clone()
        b[0, :3] = torch.tensor([9, 9, 9])
        out = [model(x, *(torch.from_numpy(v) for v in segments(x.numpy(), EOD))) for x in (a, b)]
        assert torch.equal(out[0][0, 4:], out[1][0, 4:]) == doc_mask
        assert not torch.equal(out[0][0, 3], out[1][0, 3])  # the end-of-document token belongs to the first


def test_baselines_match_a_hand_count(corpus, tmp_path):
    root, _ = corpus
    block = 32
    cfg, recipe, splits = built(["recipe=lm", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                                 "data.val_fraction=0.15", "data.test_fraction=0.15",
                                 f"data.block_size={block}"])  # fmt: skip
    folder = Path(splits.info["cache"])
    train = np.fromfile(folder / "train.bin", dtype=np.uint16).tolist()
    uni = collections.Counter(train)
    bi = collections.Counter(itertools.pairwise(train))
    ctx = collections.Counter(train[:-1])
    n, v = len(train), 257

    def p_uni(y):
        return (uni[y] + 1) / (n + v)

    def p_bi(x, y):
        return (bi[(x, y)] + v * p_uni(y)) / (ctx[x] + v)

    val = splits.val
    batch = val.__getitems__(list(range(len(val))))
    for i in (0, len(val) - 1):
        x, y = batch["x"][i].tolist(), batch["y"][i].tolist()
        assert batch["unigram_nll"][i].item() == pytest.approx(-sum(math.log(p_uni(t)) for t in y), rel=1e-5)
        assert batch["bigram_nll"][i].item() == pytest.approx(-sum(math.log(p_bi(a, t)) for a, t in zip(x, y)),
                                                              rel=1e-5)  # fmt: skip
    # metrics: perplexity and bits per byte of the rows evaluated, from the summed NLLs
    some = min(len(val), 48)
    batch = val.__getitems__(list(range(some)))
    bound = recipe.bind(cfg, splits.info)
    torch.manual_seed(0)
    model = bound.build_model().eval()
    with torch.no_grad():
        out = bound.step(model, batch)
    m = bound.metrics(out.preds, out.targets)
    ys = batch["y"].flatten().tolist()
    xs = batch["x"].flatten().tolist()
    bigram_nll = -sum(math.log(p_bi(a, t)) for a, t in zip(xs, ys))
    text_bytes = sum(t != EOD for t in ys)
    assert m["bigram_ppl"] == pytest.approx(math.exp(bigram_nll / len(ys)), rel=1e-5)
    assert m["bigram_bpb"] == pytest.approx(bigram_nll / math.log(2) / text_bytes, rel=1e-5)
    assert m["unigram_ppl"] == pytest.approx(math.exp(-sum(math.log(p_uni(t)) for t in ys) / len(ys)), rel=1e-5)
    assert m["nll"] == pytest.approx(float(out.loss.mean()), rel=1e-5) and m["ppl"] == pytest.approx(math.exp(m["nll"]))
    assert m["ppl"] == pytest.approx(257, rel=0.1)  # an untrained model is close to uniform
    assert bound.tokens(batch) == some * block


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory):
    """One token cache of the default corpus (this Python's standard library) for the tests below."""
    return tmp_path_factory.mktemp("lm_cache")


def test_default_run_learns_writes_samples_and_exports_strictly(stdlib_cache, tmp_path):
    run = tmp_path / "run"
    cfg, recipe = resolve_config([*TINY, *SMALL_EVAL, f"data.cache_dir={stdlib_cache}", f"output_dir={run}",
                                  "train.max_steps=40", "train.eval_every=20"])  # fmt: skip
    trainer = Trainer(cfg, recipe)
    assert trainer.recipe.info["source"] == "stdlib" and trainer.recipe.info["file_count"] > 100
    summary = trainer.train()
    losses = train_losses(run)
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    test = summary["test"]
    assert test["ppl"] < test["unigram_ppl"] and test["bpb"] < test["unigram_bpb"], test
    assert {"bigram_ppl", "accuracy", "nll"} <= set(test)
    evals = [r for r in metrics_rows(run) if "val/ppl" in r]
    assert [r["step"] for r in evals] == [20, 40] and all(r["val/bigram_ppl"] == evals[0]["val/bigram_ppl"]
                                                          for r in evals)  # fmt: skip
    assert all("tokens_per_s" in r for r in metrics_rows(run) if "loss" in r and "step" in r)
    samples = (run / "samples.txt").read_text()
    assert samples.count("----- sample") == 3 and samples.count(" <<<|>>> ") == 3

    out = export(run, tmp_path / "export")
    model = recipe.bind(cfg, trainer.recipe.info).build_model()
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    loaded = distrain.load_model(out)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_is_exact_with_dropout(stdlib_cache, tmp_path):
    common = [*TINY, f"data.cache_dir={stdlib_cache}", "model.dropout=0.1", "train.max_steps=6", "ckpt.every_steps=3",
              "data.samples=0", *SMALL_EVAL]  # fmt: skip
    Trainer(*resolve_config([*common, f"output_dir={tmp_path / 'a'}"])).train()
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003"
    Trainer(*resolve_config([*common, f"output_dir={tmp_path / 'b'}", f"resume={ckpt}"])).train()
    assert train_losses(tmp_path / "b")[-3:] == train_losses(tmp_path / "a")[-3:]
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiproc
def test_fsdp2_two_processes_share_one_cache_and_export(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "run"
    run_distrain([*TINY, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.15",
                  "data.test_fraction=0.15", "data.block_size=32", "train.max_steps=4", "data.batch_size=4",
                  f"output_dir={out}"], launch_config="cpu_fsdp")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "fsdp2" and summary["test"]["ppl"] > 1
    assert len(list((tmp_path / "cache" / "lm").iterdir())) == 1  # both ranks built; one folder, no leftovers
    assert "FSDP2 full shard, 2 shards; 1 x DecoderBlock + root" in (out / "train.log").read_text()  # SHARD_BLOCKS
    model = distrain.load_model(out)  # the run's checkpoint, consolidated, into the model class
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
