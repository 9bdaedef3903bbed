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
from expertflow.pipeline.store import AsyncExpertStore, ExpertHandle, ExpertStore, StoreStats
from expertflow.tiers.layout import ExpertKey, ExpertLayout
from expertflow.tiers.safetensors_index import open_checkpoint

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # load_model pulls in transformers (seconds to import); only pay for it when it is used.
    if name == "load_model":
        from expertflow.model.loader import load_model

        return load_model
    raise AttributeError(f"module 'expertflow' has no attribute {name!r}")


__all__ = [
    "AsyncExpertStore",
    "BudgetError",
    "CheckpointError",
    "ChecksumError",
    "ConfigError",
    "ExpertFlowError",
    "ExpertHandle",
    "ExpertKey",
    "ExpertLayout",
    "ExpertReadError",
    "ExpertStore",
    "FingerprintMismatchError",
    "ProtocolError",
    "RemoteError",
    "StoreClosedError",
    "StoreConfig",
    "StoreStats",
    "UnsupportedModelError",
    "__version__",
    "load_model",
    "open_checkpoint",
]
