"""Byte-level language model of Python source: a compact GPT on the standard library's own files, packed rows.

Default data: the *.py files of this Python's standard library (sysconfig's `stdlib` folder; the
test suites and site-packages left out), or of `data.root`. Each file is one document, put in a
split by a hash of its path relative to the root (so no file is in two splits, and a file's split
does not depend on which other files exist), tokenised once as bytes (vocabulary 256 + an
end-of-document token) into uint16 token files that are memory-mapped: `<data.cache_dir>/lm/<key>/`
(default `$DISTRAIN_DATA_DIR` or `~/.cache/distrain`), written atomically and keyed by a hash of the
inputs. meta.json there records the Python version, the files of each split and their sizes.

Packing (distrain.lm.packing): each split's documents are one token stream, an end-of-document token
after each, read as rows of block_size + 1 tokens (input/target shift). Every batch carries each
token's document number within its row and its position in that document; the model attends only
within a document (model.doc_mask) and restarts its positions at each document's start.

Metrics on the validation and test rows: loss (nats per token), perplexity, bits per byte and
next-byte accuracy, beside a unigram and a bigram baseline counted on the training split and
evaluated on the same rows (unigram: add-one; bigram: smoothed towards the unigram). The end of a
run writes a few generated samples to `<run dir>/samples.txt` (from the weights the test split uses).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from distrain import ConfigError, Splits, StepOutput, opt
from distrain import DataConfig as BaseDataConfig
from distrain.lm.packing import TOKEN_DTYPE, num_rows, rows, segments, write_documents

FORMAT = 1  # of the cached token files; a change of what they hold bumps it, so old caches are not read
EOD = 256  # the end-of-document token, after the 256 byte values
VOCAB = 257
SPLITS = ("train", "val", "test")
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class ModelConfig:
    width: int = opt(96, "embedding width")
    depth: int = opt(3, "decoder blocks")
    heads: int = opt(4, "attention heads")
    dropout: float = opt(0.0, "dropout on attention weights and on each residual branch")
    doc_mask: bool = opt(True, "attend only within a document and restart positions at its start; false: plain causal")


@dataclass
class DataConfig(BaseDataConfig):
    root: str | None = opt(None, "folder whose *.py files are the corpus; unset: this Python's standard library",
                           must_exist=True)  # fmt: skip
    block_size: int = opt(128, "tokens per packed row the model sees (rows hold one more, for the target shift)")
    max_bytes: int = opt(0, "use files (in a fixed hash order of their paths) up to this many bytes; 0: all")
    val_fraction: float = opt(0.02, "share of the files (by path hash) in the validation split")
    test_fraction: float = opt(0.02, "share of the files (by path hash) in the test split")
    cache_dir: str | None = opt(None, "folder of the token files; unset: $DISTRAIN_DATA_DIR or ~/.cache/distrain")
    samples: int = opt(3, "generated samples written to samples.txt at the end of a run")
    sample_tokens: int = opt(200, "bytes generated per sample")


def validate(cfg) -> None:
    d, m = cfg.data, cfg.model
    if d.block_size < 2:
        raise ConfigError(f"data.block_size={d.block_size}: a row needs at least 2 tokens")
    if not (0 < d.val_fraction < 1 and 0 < d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
        raise ConfigError(f"data.val_fraction={d.val_fraction} / data.test_fraction={d.test_fraction}: "
                          "each in (0, 1) and their sum below 1")  # fmt: skip
    if d.max_bytes < 0:
        raise ConfigError(f"data.max_bytes={d.max_bytes} must be 0 (all files) or positive")
    if m.width < 1 or m.depth < 1 or m.heads < 1 or m.width % m.heads:
        raise ConfigError(f"model.width={m.width} must be a positive multiple of model.heads={m.heads} "
                          f"(model.depth={m.depth} at least 1)")  # fmt: skip
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")


# ------------------------------------------------------------------ corpus and token files


def corpus_root(cfg) -> Path:
    return Path(cfg.data.root).expanduser().resolve() if cfg.data.root else Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime_ns) of every *.py file outside SKIPPED_DIRS, sorted by path."""
    out = []
    for folder, dirs, names in os.walk(root):  # pruned: site-packages alone can hold ten times the stdlib
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        for name in names:
            path = Path(folder) / name
            if name.endswith(".py") and path.is_file():
                st = path.stat()
                out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(out)


def path_hash(salt: str, rel: str) -> float:
    """A number in [0, 1) that depends only on the salt and the relative path."""
    return int(hashlib.sha256(f"{salt}\0{rel}".encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(files: list[tuple[str, int, int]], max_bytes: int, val: float, test: float) -> dict[str, list[str]]:
    """Split name -> sorted relative paths. The subset (up to max_bytes) and the split each take their
    own hash of the path, so a file's split is the same whichever other files are in the corpus."""
    chosen, total = [], 0
    for rel, size, _ in sorted(files, key=lambda f: path_hash("order", f[0])):
        if max_bytes and total + size > max_bytes:
            continue
        chosen.append(rel)
        total += size
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in sorted(chosen):
        u = path_hash("split", rel)
        out["test" if u < test else "val" if u < test + val else "train"].append(rel)
    return out


def cache_base(cfg) -> Path:
    base = cfg.data.cache_dir or os.environ.get("DISTRAIN_DATA_DIR") or Path.home() / ".cache" / "distrain"
    return Path(base).expanduser() / "lm"


def build_token_files(cfg) -> Path:
    """The folder of this corpus's token files, written on first use: train.bin, val.bin, test.bin
    (uint16), bigram.npy (the training split's bigram counts) and meta.json. Written in a fresh
    folder that is renamed into place, so a reader sees all of it or none; ranks that build at the
    same time each write their own and one rename wins."""
    d = cfg.data
    root = corpus_root(cfg)
    if not root.is_dir():
        raise ConfigError(f"data.root={root} is not a folder")
    files = corpus_files(root)
    key_text = json.dumps([FORMAT, str(root), sys.version, d.max_bytes, d.val_fraction, d.test_fraction, files])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    final = cache_base(cfg) / key
    if (final / "meta.json").is_file():
        return final
    splits = assign_splits(files, d.max_bytes, d.val_fraction, d.test_fraction)
    where = f"data.root={d.root}" if d.root else f"the standard library at {root}"
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        raise ConfigError(f"{where}: {len(files)} *.py files leave the {'/'.join(empty)} split empty; give more "
                          "files (data.max_bytes, data.root) or larger data.val_fraction/test_fraction")  # fmt: skip
    tmp = final.parent / f".{key}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        lengths = {}
        for split in SPLITS:
            with open(tmp / f"{split}.bin", "wb") as f:
                docs = (np.frombuffer((root / rel).read_bytes(), dtype=np.uint8) for rel in splits[split])
                lengths[split] = write_documents(docs, EOD, f)
        np.save(tmp / "bigram.npy", bigram_counts(np.memmap(tmp / "train.bin", dtype=TOKEN_DTYPE, mode="r")))
        meta = {
            "format": FORMAT,
            "source": str(root) if d.root else "stdlib",
            "root": str(root),
            "python": sys.version.split()[0],
            "file_count": sum(len(v) for v in splits.values()),
            "files": {s: len(splits[s]) for s in SPLITS},
            "tokens": {s: sum(lengths[s]) for s in SPLITS},
            "bytes": {s: sum(lengths[s]) - len(lengths[s]) for s in SPLITS},
            "eod": EOD,
            "vocab": VOCAB,
            "documents": splits,  # in file order: split.bin is these files, each followed by EOD
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first: the same inputs, the same files
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def bigram_counts(tokens: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """[VOCAB, VOCAB] int64 counts of (token, next token) over the stream, read in chunks."""
    counts = np.zeros(VOCAB * VOCAB, dtype=np.int64)
    for s in range(0, max(len(tokens) - 1, 0), chunk):
        a = np.asarray(tokens[s : s + chunk + 1], dtype=np.int64)
        counts += np.bincount(a[:-1] * VOCAB + a[1:], minlength=VOCAB * VOCAB)
    return counts.reshape(VOCAB, VOCAB)


def baseline_log_probs(bigram: np.ndarray, unigram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log p(y) [V], log p(y | x) [V, V]) from training counts: the unigram add-one smoothed, the
    bigram smoothed towards the unigram, p(y | x) = (c(x, y) + V p(y)) / (c(x) + V)."""
    p_uni = (unigram + 1.0) / (unigram.sum() + VOCAB)
    p_bi = (bigram + VOCAB * p_uni[None, :]) / (bigram.sum(1, keepdims=True) + VOCAB)
    return np.log(p_uni), np.log(p_bi)


class PackedRows(Dataset):
    """Rows of block_size + 1 tokens of a memory-mapped token file (distrain.lm.packing). A batch is one
    gather from the file: x, y (the shifted targets), doc and pos [B, T] int64, and for evaluation
    splits each row's unigram and bigram negative log-likelihood (sums over its T targets)."""

    def __init__(self, path: Path, block: int, baselines: dict[str, np.ndarray] | None = None):
        self.path, self.block, self.baselines = Path(path), block, baselines or {}
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")

    def __getstate__(self) -> dict[str, Any]:  # a worker process maps the file itself, no copy of it
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")

    def __len__(self) -> int:
        return num_rows(len(self.tokens), self.block)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        r = rows(self.tokens, idx, self.block).astype(np.int64)
        x, y = r[:, :-1], r[:, 1:]
        doc, pos = segments(x, EOD)
        out = {"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.from_numpy(np.ascontiguousarray(y)),
               "doc": torch.from_numpy(doc), "pos": torch.from_numpy(pos)}  # fmt: skip
        out.update({k: torch.from_numpy(v[idx]) for k, v in self.baselines.items()})
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def row_baselines(tokens: np.ndarray, block: int, log_uni: np.ndarray, log_bi: np.ndarray,
                  chunk: int = 4096) -> dict[str, np.ndarray]:  # fmt: skip
    """Each row's unigram and bigram NLL (float32 sums over its targets), a chunk of rows at a time."""
    n = num_rows(len(tokens), block)
    uni, bi = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for s in range(0, n, chunk):
        r = rows(tokens, np.arange(s, min(s + chunk, n)), block).astype(np.int64)
        x, y = r[:, :-1], r[:, 1:]
        uni[s : s + len(r)] = -log_uni[y].sum(1)
        bi[s : s + len(r)] = -log_bi[x, y].sum(1)
    return {"unigram_nll": uni, "bigram_nll": bi}


def build_datasets(cfg) -> Splits:
    folder = build_token_files(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    block = cfg.data.block_size
    bigram = np.load(folder / "bigram.npy")
    train_tokens = np.memmap(folder / "train.bin", dtype=TOKEN_DTYPE, mode="r")
    unigram = bigram.sum(0)  # every token but the stream's first is some pair's second
    unigram[int(train_tokens[0])] += 1
    log_uni, log_bi = baseline_log_probs(bigram, unigram)
    data: dict[str, PackedRows] = {}
    for split in SPLITS:
        path = folder / f"{split}.bin"
        extra = None
        if split != "train":
            extra = row_baselines(np.memmap(path, dtype=TOKEN_DTYPE, mode="r"), block, log_uni, log_bi)
        data[split] = PackedRows(path, block, extra)
        if len(data[split]) == 0:
            raise ConfigError(f"data.block_size={block}: the {split} split's {meta['tokens'][split]} tokens "
                              "give no row; use a smaller block or more files")  # fmt: skip
    info = {
        "vocab": VOCAB, "eod": EOD, "block_size": block, "python": meta["python"], "source": meta["source"],
        "file_count": meta["file_count"], "files": meta["files"], "tokens": meta["tokens"], "cache": str(folder),
    }  # fmt: skip
    return Splits(train=data["train"], val=data["val"], test=data["test"], info=info)


# ------------------------------------------------------------------ model


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention and MLP; the unit FSDP2 shards and activation checkpointing wraps."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.norm2(x)))))


class GPT(nn.Module):
    """Token and position embeddings, decoder blocks, a final norm and an (untied) output layer."""

    def __init__(self, vocab: int, block_size: int, m: ModelConfig):
        super().__init__()
        self.block_size, self.doc_mask = block_size, m.doc_mask
        self.tok = nn.Embedding(vocab, m.width)
        self.pos = nn.Embedding(block_size, m.width)
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(m.width, m.heads, m.dropout) for _ in range(m.depth))
        self.norm = nn.LayerNorm(m.width)
        self.head = nn.Linear(m.width, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation, residual outputs scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * m.depth) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, doc: torch.Tensor | None = None,
                pos: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Logits [B, T, vocab]. With `doc` (and doc_mask) a token attends only to earlier tokens of its
        own document; `pos` are the positions (default 0..T-1)."""
        t = x.shape[1]
        if pos is None or not self.doc_mask:
            pos = torch.arange(t, device=x.device)
        mask = None
        if doc is not None and self.doc_mask:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
        h = self.drop(self.tok(x) + self.pos(pos))
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.8, top_k: int = 40,
                 generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """`prompt` [B, T0] continued by sampling `new_tokens` tokens (the context cropped to block_size)."""
        x = prompt
        for _ in range(new_tokens):
            logits = self(x[:, -self.block_size :])[:, -1].float() / temperature
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
            x = torch.cat([x, torch.multinomial(probs, 1, generator=generator)], 1)
        return x


SHARD_BLOCKS = ("DecoderBlock",)


def build_model(cfg, info: dict) -> nn.Module:
    return GPT(info["vocab"], info["block_size"], cfg.model)


def step(cfg, info: dict, model: nn.Module, batch: dict) -> StepOutput:
    logits = model(batch["x"], batch["doc"], batch["pos"]).float()
    y = batch["y"]
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # [B, T]
    # Per-token losses: distrain divides their sum by the step's global token count (every packed
    # row has T targets, so no mask is needed).
    loss = nll
    if "bigram_nll" not in batch:  # a training batch: no metrics
        return StepOutput(loss=loss)
    correct = (logits.argmax(-1) == y).sum(1)
    preds = torch.stack([nll.sum(1).detach(), batch["unigram_nll"].float(), batch["bigram_nll"].float(),
                         correct.float()], 1)  # fmt: skip
    targets = torch.stack([torch.full_like(correct, y.shape[1]), (y != info["eod"]).sum(1)], 1)
    return StepOutput(loss=loss, preds=preds, targets=targets)


def tokens(cfg, info: dict, batch: dict) -> int:
    return batch["x"].numel()


def metrics(cfg, info: dict, preds: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-token NLL, perplexity and bits per byte of the model and both baselines; next-byte accuracy.
    Bits per byte: all targets' bits (end-of-document tokens too) over the text bytes among them."""
    sums = preds.double().sum(0)
    n_tokens, n_bytes = (float(v) for v in targets.double().sum(0))
    out: dict[str, float] = {}
    for name, total in (("", sums[0]), ("unigram_", sums[1]), ("bigram_", sums[2])):
        nll = float(total) / n_tokens
        out[f"{name}nll"] = nll
        out[f"{name}ppl"] = math.exp(nll)
        out[f"{name}bpb"] = float(total) / math.log(2) / max(n_bytes, 1.0)
    out["accuracy"] = float(sums[3]) / n_tokens
    return out


def report(cfg, info: dict, run_dir: Path, split: str, preds: torch.Tensor, targets: torch.Tensor) -> None:
    """The figures beside the baselines, and samples.txt: a few continuations of code-like prompts
    sampled from the weights the test split used (best_model.safetensors when it exists)."""
    m = metrics(cfg, info, preds, targets)
    print(f"lm {split}: ppl {m['ppl']:.3f} (bigram {m['bigram_ppl']:.3f}, unigram {m['unigram_ppl']:.3f}), "
          f"bits/byte {m['bpb']:.3f} (bigram {m['bigram_bpb']:.3f}), next-byte accuracy {m['accuracy']:.3f}")
    if cfg.data.samples > 0:
        write_samples(cfg, info, Path(run_dir))


def sample_prompts(info: dict, count: int, length: int = 32) -> torch.Tensor:
    """[count, length] prompts: the first bytes of the test split's first documents (held-out files),
    or "import " where the token files are gone."""
    path = Path(info.get("cache", "")) / "test.bin"
    if not path.is_file():
        return torch.tensor([list(b"import ")] * count)
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    starts = np.concatenate([[0], np.flatnonzero(tokens[:-1] == EOD) + 1])
    starts = np.resize(starts, count)  # cycled when the split has fewer documents
    length = min(length, len(tokens) - int(starts.max()))
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


def write_samples(cfg, info: dict, run_dir: Path) -> Path:
    """samples.txt: data.samples continuations of held-out files' first bytes, sampled (in one batch)
    from the weights the test split used, loaded into the model class with strict=True."""
    from safetensors.torch import load_file

    weights = run_dir / "best_model.safetensors"
    weights = weights if weights.is_file() else run_dir / "model.safetensors"
    model = build_model(cfg, info)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    generator = torch.Generator().manual_seed(cfg.train.seed)
    prompts = sample_prompts(info, cfg.data.samples)
    out = model.generate(prompts, cfg.data.sample_tokens, generator=generator)
    lines = [f"# {cfg.data.samples} samples of {cfg.data.sample_tokens} bytes from {weights.name} (temperature "
             "0.8, top-k 40), each continuing the first bytes of a test-split file (between the markers)"]  # fmt: skip
    for i, row in enumerate(out.tolist()):
        n = prompts.shape[1]
        text = decode(row[:n]) + " <<<|>>> " + decode(row[n:])
        lines += [f"\n----- sample {i + 1}", text]
    path = run_dir / "samples.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def decode(tokens: list[int]) -> str:
    """Bytes as UTF-8 text (invalid sequences replaced), the end-of-document token as a marker line."""
    text = b"".join(bytes([t]) if t < 256 else b"\n<|end of document|>\n" for t in tokens)
    return text.decode("utf-8", errors="replace")
