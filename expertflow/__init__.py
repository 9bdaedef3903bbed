"""ExpertFlow: run Mixture-of-Experts models whose experts do not fit in memory."""

from expertflow.config import StoreConfig
from expertflow.errors import (
    BudgetError,
    CheckpointError,
    ChecksumError,
    ConfigError,
    ExpertFlowError,
    ExpertReadError,
    FingerprintMismatchError,
    ProtocolError,
    RemoteError,
    StoreClosedError,
    UnsupportedModelError,
)
from expertflow.tiers.layout import ExpertKey, ExpertLayout
from expertflow.tiers.safetensors_index import open_checkpoint

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ChecksumError",
    "ConfigError",
    "ExpertFlowError",
    "ExpertKey",
    "ExpertLayout",
    "ExpertReadError",
    "FingerprintMismatchError",
    "ProtocolError",
    "RemoteError",
    "StoreClosedError",
    "StoreConfig",
    "UnsupportedModelError",
    "__version__",
    "open_checkpoint",
]
