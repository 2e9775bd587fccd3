"""distrain: one accelerate-driven training loop for every recipe and every backend."""

from distrain.config import Config, ConfigError, DataConfig, opt
from distrain.data import ArrayDataset
from distrain.recipe import Splits, StepOutput

__all__ = ["ArrayDataset", "Config", "ConfigError", "DataConfig", "Splits", "StepOutput", "opt"]
__version__ = "0.1.0"
