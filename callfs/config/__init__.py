"""Configuration: every key declared once (``schema``), loaded from layers (``loader``)."""

from callfs.config.loader import load_config, parse_duration
from callfs.config.schema import (
    AuthConfig,
    BackendConfig,
    Config,
    DlmConfig,
    ErasureConfig,
    HaConfig,
    InstanceDiscoveryConfig,
    LogConfig,
    MetadataStoreConfig,
    MetricsConfig,
    RaftConfig,
    ServerConfig,
)

__all__ = [
    "AuthConfig",
    "BackendConfig",
    "Config",
    "DlmConfig",
    "ErasureConfig",
    "HaConfig",
    "InstanceDiscoveryConfig",
    "LogConfig",
    "MetadataStoreConfig",
    "MetricsConfig",
    "RaftConfig",
    "ServerConfig",
    "load_config",
    "parse_duration",
]
