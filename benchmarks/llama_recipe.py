"""A Llama causal language model on synthetic tokens (the memory benchmark's recipe; needs transformers).

The default is the 103M-parameter model of issue 16 (hidden 1024, 8 layers, FFN 2816, 16 heads,
a 256-token byte vocabulary, untied embeddings); `model.*` keys shrink it. The tokens are drawn
once from a fixed generator, so every rank and every run sees the same data without a download.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distrain import DataConfig as BaseDataConfig
from distrain import Splits, StepOutput, opt

SHARD_BLOCKS = ("LlamaDecoderLayer",)


@dataclass
class ModelConfig:
    hidden: int = opt(1024, "hidden size")
    layers: int = opt(8, "decoder layers")
    ffn: int = opt(2816, "MLP intermediate size")
    heads: int = opt(16, "attention heads (as many key/value heads)")


@dataclass
class DataConfig(BaseDataConfig):
    vocab: int = opt(256, "vocabulary size of the synthetic tokens")
    seq_len: int = opt(64, "tokens per sample (the model predicts each next one)")
    train_samples: int = opt(64, "synthetic training sequences")
    val_samples: int = opt(8, "synthetic validation sequences")


def build_datasets(cfg: Any) -> Splits:
    d = cfg.data
    g = torch.Generator().manual_seed(0)  # the data are the same for every seed, rank and run
    tokens = torch.randint(0, d.vocab, (d.train_samples + d.val_samples, d.seq_len + 1), generator=g)
    return Splits(train={"tokens": tokens[: d.train_samples]}, val={"tokens": tokens[d.train_samples :]},
                  info={"vocab": d.vocab})  # fmt: skip


def build_model(cfg: Any, info: dict[str, Any]) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(vocab_size=info["vocab"], hidden_size=m.hidden, intermediate_size=m.ffn,
                         num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.heads,
                         max_position_embeddings=max(cfg.data.seq_len, 128), tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def step(cfg: Any, info: dict[str, Any], model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    tokens = batch["tokens"]
    logits = model(input_ids=tokens[:, :-1]).logits
    per_token = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
    return StepOutput(loss=per_token.mean(1))


def metrics(cfg: Any, info: dict[str, Any], preds: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    return {}  # the validation loss (distrain's own) is the metric


def tokens(cfg: Any, info: dict[str, Any], batch: dict[str, torch.Tensor]) -> int:
    return batch["tokens"][:, 1:].numel()
