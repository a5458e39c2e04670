"""Typed config models and the YAML loader."""

from .loader import ConfigError, LoadedConfig, Secret, check_secrets, load_config, parse_config
from .models import EnclaveConfig

__all__ = [
    "ConfigError",
    "EnclaveConfig",
    "LoadedConfig",
    "Secret",
    "check_secrets",
    "load_config",
    "parse_config",
]
