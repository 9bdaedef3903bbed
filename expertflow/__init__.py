"""ExpertFlow: run Mixture-of-Experts models whose experts do not fit in memory."""

from expertflow._version import __version__
from expertflow.assemble import open_async_store, open_store
from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
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
from expertflow.pipeline.budget import BudgetPlan
from expertflow.pipeline.stats import StoreStats
from expertflow.pipeline.store import AsyncExpertStore, ExpertHandle, PendingFetch
from expertflow.pipeline.sync import ExpertStore
from expertflow.threads import set_threads
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.safetensors_index import open_checkpoint


def __getattr__(name: str) -> object:
    # load_model pulls in transformers (seconds to import); only pay for it when it is used.
    if name == "load_model":
        from expertflow.model.loader import load_model

        return load_model
    raise AttributeError(f"module 'expertflow' has no attribute {name!r}")


__all__ = [
    "AsyncExpertStore",
    "BudgetError",
    "BudgetPlan",
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
    "PendingFetch",
    "ProtocolError",
    "RemoteError",
    "StoreClosedError",
    "StoreConfig",
    "StoreStats",
    "UnsupportedModelError",
    "__version__",
    "load_model",
    "open_async_store",
    "open_checkpoint",
    "open_store",
    "set_threads",
]
