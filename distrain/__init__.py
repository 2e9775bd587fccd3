"""distrain: one accelerate-driven training loop for every recipe and every backend."""

from distrain.config import Config, DataConfig, opt
from distrain.errors import ConfigError
from distrain.recipe import Splits, StepOutput
from distrain.train.data import ArrayDataset, TokenFile
from distrain.version import __version__

__all__ = [
    "ArrayDataset", "Config", "ConfigError", "DataConfig", "Splits", "StepOutput", "TokenFile", "__version__",
    "load_model", "opt",
]


def load_model(path: str, trust_recipe: bool = False) -> "torch.nn.Module":  # noqa: F821 (torch is imported lazily)
    """The recipe's model with exported or checkpointed weights, on CPU, no process group (distrain.checkpoint.export).

    A folder whose config names a recipe file outside recipes/ needs trust_recipe=True: loading runs that file.
    """
    from distrain.checkpoint.export import load_model as _load_model

    return _load_model(path, trust_recipe=trust_recipe)
