"""Configuration: typed dataclasses, YAML + dotted overrides, validation."""
from .loader import ConfigError, config_to_dict, load_config, parse_overrides, save_config
from .schema import (CheckpointConfig, Config, DataConfig, LoggingConfig, MLAConfig,
                     ModelConfig, ParallelConfig, PEERConfig, TokenizerConfig, TrainingConfig,
                     WandbConfig)
from .validate import layer_kinds, validate_config

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "MLAConfig",
    "ModelConfig", "ParallelConfig", "PEERConfig", "TokenizerConfig", "TrainingConfig",
    "WandbConfig", "config_to_dict", "layer_kinds", "load_config", "parse_overrides",
    "save_config", "validate_config",
]
