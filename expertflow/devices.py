"""Which compute devices this process can use: refused with a one-line reason before anything loads."""

from __future__ import annotations

import torch

from expertflow.errors import ConfigError


def check_device(name: str | torch.device | None) -> torch.device:
    """``name`` as a device ExpertFlow can compute on here (``cpu``, or ``cuda[:i]`` with a GPU torch sees).

    Raises :class:`ConfigError` for a malformed name, a device type ExpertFlow does not run on, or a CUDA device
    this torch build or machine does not have.
    """
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{name!r} is not a device name: use cpu or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"ExpertFlow computes on cpu or cuda, not {device.type!r}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"cannot use {name}: {why}; use --device cpu")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"cannot use {name}: {torch.cuda.device_count()} CUDA device(s) visible")
    return device
