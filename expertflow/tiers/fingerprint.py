"""Content fingerprint of a checkpoint's experts: structure plus a sample of the weights themselves.

``ExpertLayout.fingerprint()`` covers structure only, so two fine-tunes of one architecture share it. A
client and an expert server compare this fingerprint instead: it also hashes the first and last bytes of
every tensor of a few experts spread over the checkpoint, read from the files. It depends only on tensor
bytes (never on file names or offsets), so a packed copy has the fingerprint of its source.
"""

from __future__ import annotations

import hashlib
import os

from expertflow.core import ExpertKey
from expertflow.errors import CheckpointError
from expertflow.tiers.layout import ExpertLayout, TensorSlice

SAMPLE_EXPERTS = 8
SAMPLE_BYTES = 4096


def sample_keys(layout: ExpertLayout, count: int = SAMPLE_EXPERTS) -> list[ExpertKey]:
    """``count`` experts evenly spread over the sorted keys (first and last included)."""
    keys = layout.keys()
    if len(keys) <= count:
        return keys
    step = (len(keys) - 1) / (count - 1)
    return sorted({keys[round(i * step)] for i in range(count)})


def _sample(fd: int, t: TensorSlice, nbytes: int) -> bytes:
    spans = [(t.offset, min(nbytes, t.nbytes))]
    if t.nbytes > nbytes:
        spans.append((t.offset + t.nbytes - nbytes, nbytes))
    out = []
    for offset, length in spans:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise CheckpointError(f"short read of {len(data)}/{length} bytes", file=t.file, tensor=t.source)
        out.append(data)
    return b"".join(out)


def content_fingerprint(
    layout: ExpertLayout, *, experts: int = SAMPLE_EXPERTS, sample_bytes: int = SAMPLE_BYTES
) -> str:
    """32 hex digits: equal for checkpoints with the same expert structure and the same sampled weights."""
    h = hashlib.sha256(layout.fingerprint().encode())
    fds: dict[str, int] = {}
    try:
        for key in sample_keys(layout, experts):
            for t in layout.spec(key).tensors:
                fd = fds.get(t.file)
                if fd is None:
                    try:
                        fd = fds[t.file] = os.open(t.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    except OSError as exc:
                        raise CheckpointError(f"cannot open file: {exc.strerror}", file=t.file) from exc
                h.update(f"{key.layer}/{key.expert}/{t.role}".encode())
                h.update(_sample(fd, t, sample_bytes))
    finally:
        for fd in fds.values():
            os.close(fd)
    return h.hexdigest()[:32]
