"""Hugging Face interop: an export of a transformers model loads with `from_pretrained` in a process
that never imports distrain, and gives the logits of `distrain.load_model`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import distrain
from distrain.checkpoint.export import export

from helpers import BIN, REPO, run_distrain

pytest.importorskip("transformers")

LLAMA = [f"recipe={REPO / 'benchmarks' / 'llama_recipe.py'}", "model.hidden=32",
         "model.layers=2", "model.ffn=64", "model.heads=2", "data.seq_len=16", "data.train_samples=16",
         "data.val_samples=4", "data.batch_size=4", "train.max_steps=2", "log.progress=false"]  # fmt: skip
LOAD_WITHOUT_DISTRAIN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert not any(name.startswith("distrain") for name in sys.modules), "distrain was imported"
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist()}))
"""


def test_export_of_a_transformers_model_loads_with_from_pretrained(tmp_path):
    run = tmp_path / "run"
    run_distrain([*LLAMA, f"output_dir={run}"])
    ids = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]]
    for shard in (None, "40KB"):  # one file; shards with the index
        out = tmp_path / f"export-{shard}"
        cmd = [str(BIN / "distrain"), "export", str(run), "--out", str(out), "--trust-recipe",
               *(["--max-shard-size", shard] if shard else [])]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path)
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 32
        assert (out / "generation_config.json").is_file()
        assert (out / "model.safetensors.index.json").is_file() == bool(shard)

        proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DISTRAIN, str(out), json.dumps(ids)],
                              capture_output=True, text=True, cwd=tmp_path, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        assert loaded["class"] == "LlamaForCausalLM"
        model = distrain.load_model(out, trust_recipe=True)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor(ids)).logits
        assert torch.equal(torch.tensor(loaded["logits"], dtype=expected.dtype), expected)


def test_export_of_another_model_writes_no_hf_config(tmp_path):
    run = tmp_path / "run"
    run_distrain(["recipe=har", "model.width=16", "model.depth=1", "model.heads=2", "train.max_steps=2",
                  "log.progress=false", f"output_dir={run}"])  # fmt: skip
    out = export(run, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()
