"""The Hugging Face files of an export: when the recipe's model is a transformers `PreTrainedModel`,
its `config.json` (and `generation_config.json` where the model has one) beside the weights, so
`AutoModel*.from_pretrained(folder)` loads the export with no distrain import.

The weights need nothing extra: distrain's keys are the model's own `state_dict()` names, which
are transformers' names when the recipe returns the transformers model itself, and the export
already writes the single-file or the sharded-with-index layout `from_pretrained` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("distrain")

HF_FILES = ("config.json", "generation_config.json")  # what write_hf_files may write (an export replaces them)


def transformers_model(model: torch.nn.Module) -> Any | None:
    """The model if it is a transformers PreTrainedModel (None otherwise, or without transformers)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return model if isinstance(model, PreTrainedModel) else None


def build_on_meta(build: Any) -> torch.nn.Module:
    """The recipe's model without its weights' memory (only the class and config are needed); a
    constructor that cannot run on the meta device (it reads a file's values, say) runs on CPU."""
    try:
        with torch.device("meta"):
            return build()
    except Exception as e:
        log.debug("building on meta failed (%s); building on CPU", e)
        return build()


def write_hf_files(model: torch.nn.Module, out: Path, state_keys: set[str]) -> list[str]:
    """config.json (+ generation_config.json) of a transformers model into `out`; the names written.
    Nothing for another model. The weights' keys must be the model's own: a recipe that wraps the
    transformers model would need a key mapping, so that is refused rather than exported half-loadable."""
    hf = transformers_model(model)
    if hf is None:
        return []
    own = set(hf.state_dict())
    if not state_keys <= own:
        extra = sorted(state_keys - own)[:3]
        raise ValueError(f"the weights hold keys the transformers model does not have: {extra}")
    hf.config.architectures = [type(hf).__name__]  # as save_pretrained records it, for AutoModel's dispatch
    hf.config.to_json_file(str(out / "config.json"))
    written = ["config.json"]
    generation = getattr(hf, "generation_config", None)
    if generation is not None and hf.can_generate():
        generation.to_json_file(str(out / "generation_config.json"))
        written.append("generation_config.json")
    return written
