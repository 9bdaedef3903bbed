"""Typed exceptions. Everything a user, a file or a peer can cause raises one of these."""

from __future__ import annotations


class ExpertFlowError(Exception):
    """Base class of every error ExpertFlow raises on purpose."""


class CheckpointError(ExpertFlowError):
    """A checkpoint directory or file is missing, malformed, truncated or inconsistent.

    The message names the file (and the tensor, where one is involved) and what to do.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        parts = [message]
        if file is not None:
            parts.append(f"file: {file}")
        if tensor is not None:
            parts.append(f"tensor: {tensor}")
        super().__init__(" | ".join(parts))
        self.file = file
        self.tensor = tensor


class UnsupportedModelError(CheckpointError):
    """The checkpoint is readable but is not a MoE architecture ExpertFlow can run."""


class ChecksumError(CheckpointError):
    """Bytes read for an expert do not match their recorded checksum: never computed on."""


class BudgetError(ExpertFlowError):
    """A memory budget is too small for the work asked of it, or a wait for space timed out."""


class ConfigError(ExpertFlowError):
    """An invalid StoreConfig or command-line option."""


class StoreClosedError(ExpertFlowError):
    """The ExpertStore was closed while a request was outstanding or made after close()."""


class ExpertReadError(ExpertFlowError):
    """Reading an expert failed; reaches exactly the callers that waited for that expert."""

    def __init__(self, message: str, *, key: object | None = None) -> None:
        super().__init__(message if key is None else f"{message} (expert {key})")
        self.key = key


class CheckpointChangedError(ExpertReadError):
    """A checkpoint file was truncated, rewritten or replaced after it was opened: its bytes are no longer
    the ones the store (or daemon) announced, so none of them is read."""


class ProtocolError(ExpertFlowError):
    """A network message violates the wire protocol (malformed, too large, wrong version)."""


class RemoteError(ExpertFlowError):
    """A remote expert server answered with an error, refused us, or stopped answering."""

    def __init__(self, message: str, *, code: str | None = None, address: str | None = None) -> None:
        detail = message
        if code is not None:
            detail = f"[{code}] {detail}"
        if address is not None:
            detail = f"{detail} (server {address})"
        super().__init__(detail)
        self.code = code
        self.address = address


class FingerprintMismatchError(RemoteError):
    """A server serves a different checkpoint than the one the client loaded."""


class UnverifiableExpertError(RemoteError):
    """A daemon's copy of an expert cannot be checked: the local copy's checksum is not known yet.

    Not a failure of the daemon: the store reads the expert locally, which records its checksum.
    """


class UnverifiedFamilyWarning(UserWarning):
    """A model runs without the load-time family check (``trust_family=True``): nothing proves that its offloaded
    experts compute what its family's own module computes."""


__all__ = [
    "BudgetError",
    "CheckpointError",
    "ChecksumError",
    "ConfigError",
    "ExpertFlowError",
    "ExpertReadError",
    "FingerprintMismatchError",
    "ProtocolError",
    "RemoteError",
    "StoreClosedError",
    "UnsupportedModelError",
    "UnverifiableExpertError",
    "UnverifiedFamilyWarning",
]
