"""Checksums of an unpacked checkpoint's experts, computed from the local copy and cached in the user's cache.

A pack's manifest records a checksum per expert; a checkpoint as ``save_pretrained`` wrote it has none. A
store that reads experts from a daemon must still never use bytes that differ from its own copy, so it keeps
its own: the first time an expert is read from the local disk its checksum (``core.expert_checksum``, seeded
by the key) is computed and appended to a small text file, and from then on a daemon's reply for that expert
is checked against it. An expert without a local checksum is not taken from a daemon at all.

The file is named by the checkpoint's fingerprint and its files' identity under the cache directory
(``core.cache_dir()/checksums``: ``$EXPERTFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/expertflow``, else
``~/.cache/expertflow``), as Hub-style tools keep theirs: nothing is written into a model's folder. Its first line
names the expert structure and the identity (inode, size, mtime) of every weight file; a file that does not
match is started afresh, so a checkpoint replaced or edited in place never inherits old values. Each further
line is ``layer expert checksum``; lines are appended whole, so a torn last line is the only damage a crash
can do, and it is skipped.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import xxhash

from expertflow.core import ExpertKey, cache_dir, name_index
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.safetensors_index import open_regular

log = logging.getLogger(__name__)

FILE_NAME = ".expertflow-checksums"  # where versions before 0.2 wrote it: in the model folder (packs skip it)
MAGIC = "expertflow-checksums"
VERSION = 1
_LINE_MAX = 64  # "layer expert 16-hex-digits\n" with room to spare


def files_identity(layout: ExpertLayout) -> str:
    """A digest of the inode, size and mtime of every weight file: changes when any file is replaced or edited."""
    h = xxhash.xxh3_64()
    for file in sorted(layout.files):
        st = os.stat(file)
        h.update(f"{os.path.basename(file)} {st.st_ino} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return cache_dir() / "checksums"


class LocalChecksums:
    """The local copy's checksum of each expert read so far; thread-safe. Create with :meth:`open`."""

    def __init__(
        self,
        layout: ExpertLayout,
        values: dict[ExpertKey, int],
        fd: int | None,
        path: Path | None,
    ) -> None:
        self.layout = layout
        self.path = path  # None: nowhere writable, values live for this process only
        self._values = values
        self._fd = fd
        self._lock = threading.Lock()
        self.loaded = len(values)  # values that came from the file
        self.recorded = 0  # values computed by this process

    @classmethod
    def open(cls, layout: ExpertLayout, cache_dir: Path | None = None) -> LocalChecksums:
        """The book for ``layout``: the values its cache file holds if that file matches this exact copy."""
        fingerprint, identity = layout.fingerprint(), files_identity(layout)
        header = f"{MAGIC} {VERSION} {fingerprint} {identity}"
        path = (cache_dir or default_cache_dir()) / f"{fingerprint}-{identity}"
        try:
            values = _read(path, header, layout)
            fd = _open_for_append(path, header, fresh=values is None)
        except OSError as exc:
            log.warning(
                "the expert checksum cache %s is not usable (%s); checksums of %s last for this run only",
                path,
                exc,
                layout.root,
            )
            return cls(layout, {}, None, None)
        return cls(layout, values or {}, fd, path)

    def get(self, key: ExpertKey) -> int | None:
        """The local copy's checksum of ``key``, or None if it was never read locally."""
        return self._values.get(key)

    def __len__(self) -> int:
        return len(self._values)

    def record(self, key: ExpertKey, value: int) -> None:
        """Remember the checksum of ``key`` as computed from the local copy, and append it to the file."""
        with self._lock:
            if key in self._values:
                return
            self._values[key] = value
            self.recorded += 1
            if self._fd is not None:
                try:
                    os.write(self._fd, f"{key.layer} {key.expert} {value:016x}\n".encode())
                except OSError as exc:  # a full disk loses the cache, never a read
                    log.warning("cannot append to %s (%s); checksums last for this run only", self.path, exc)
                    os.close(self._fd)
                    self._fd = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _read(path: Path, header: str, layout: ExpertLayout) -> dict[ExpertKey, int] | None:
    """The values in ``path`` if its header is ``header``; None if it is missing, stale or not ours."""
    try:
        fd = open_regular(path)
    except Exception:  # missing, or not a regular file: start afresh
        return None
    try:
        limit = len(header) + 1 + _LINE_MAX * max(1, len(layout.experts))
        size = os.fstat(fd).st_size
        if size > limit:
            log.warning("checksum cache %s is larger than %d bytes; starting afresh", path, limit)
            return None
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    lines = data.decode("ascii", errors="replace").split("\n")
    if lines[0] != header:
        return None
    values: dict[ExpertKey, int] = {}
    conflicting: set[ExpertKey] = set()
    for line in lines[1:-1]:  # the part after the last newline is empty or a torn append
        parsed = _parse_line(line)
        if parsed is None or parsed[0] not in layout.experts:
            continue
        key, value = parsed
        if values.get(key, value) != value:
            conflicting.add(key)
        values[key] = value
    for key in conflicting:  # two processes disagreed: trust neither, it is recomputed on the next read
        del values[key]
    return values


def _parse_line(line: str) -> tuple[ExpertKey, int] | None:
    parts = line.split(" ")
    if len(parts) != 3 or len(parts[2]) != 16 or not parts[2].isascii():
        return None
    layer, expert = name_index(parts[0]), name_index(parts[1])
    try:
        value = int(parts[2], 16)
    except ValueError:
        return None
    if layer is None or expert is None:
        return None
    return ExpertKey(layer, expert), value


def _open_for_append(path: Path, header: str, *, fresh: bool) -> int:
    """An append descriptor on ``path``; a fresh file is written whole (header first) and renamed into place."""
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(header + "\n")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    return fd


def fill(book: LocalChecksums) -> int:
    """Read every expert whose checksum ``book`` lacks from the local copy, recording it; returns how many.

    What ``expertflow checksums DIR`` runs, so that daemons serve every expert from the first run on.
    """
    from expertflow.tiers.nvme import NvmeTier  # nvme refers to this module for its type only

    missing = [k for k in sorted(book.layout.experts) if book.get(k) is None]
    if not missing:
        return 0
    with NvmeTier(book.layout, "mmap", checksums=book) as tier:
        buf = memoryview(bytearray(tier.buffer_nbytes()))
        for key in missing:
            tier.read_into(key, buf)
    return len(missing)
