"""distrain: one accelerate-driven training loop for every recipe and every backend."""

from distrain.config import Config, ConfigError, DataConfig, opt
from distrain.data import ArrayDataset
from distrain.recipe import Splits, StepOutput

__all__ = ["ArrayDataset", "Config", "ConfigError", "DataConfig", "Splits", "StepOutput", "load_model", "opt"]
__version__ = "0.1.0"


def load_model(path: str, trust_recipe: bool = False) -> "torch.nn.Module":  # noqa: F821 (torch is imported lazily)
    """The recipe's model with exported or checkpointed weights, on CPU, no process group (distrain.export).

    A folder whose config names a recipe file outside recipes/ needs trust_recipe=True: loading runs that file.
    """
    from distrain.export import load_model as _load_model

    return _load_model(path, trust_recipe=trust_recipe)
