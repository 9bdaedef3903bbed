"""The input embedding read by row from the checkpoint file, not held whole.

A token needs one row of its embedding table, yet the table is a large non-expert weight (131 MB for a 32k
vocabulary at hidden 2048 in bf16), and beyond RAM every byte held resident is taken from the expert pool. The
table is memory-mapped (private, read-only in practice) and each forward gathers its tokens' rows: the page
cache keeps the rows in use, and the kernel may drop them under pressure like any clean page. The values are
the file's bytes, so outputs are the same as with the table loaded.

A memory-mapped file that shrinks under the mapping kills the process (SIGBUS) on the next read of a lost page;
each forward first checks that the file is still the one mapped (size, inode, modification time) and raises
:class:`~expertflow.errors.CheckpointError` otherwise.
"""

from __future__ import annotations

import mmap
import os

import torch
from torch import nn
from torch.nn import functional as F

from expertflow.core import torch_dtype
from expertflow.errors import CheckpointError, StoreClosedError
from expertflow.tiers.layout import TensorInfo


class FileEmbedding(nn.Module):
    """``nn.Embedding`` over a table that stays in its safetensors file; owns the file and its mapping."""

    def __init__(self, info: TensorInfo, padding_idx: int | None = None) -> None:
        super().__init__()
        if len(info.shape) != 2:
            raise CheckpointError(
                f"an embedding table has 2 dimensions, not {len(info.shape)}",
                file=info.file,
                tensor=info.name,
            )
        self.num_embeddings, self.embedding_dim = (int(n) for n in info.shape)
        self.padding_idx = padding_idx
        self.file = info.file
        self.tensor_name = info.name
        self._fd = os.open(info.file, os.O_RDONLY)
        try:
            self._identity = _identity(os.fstat(self._fd))
            if info.offset + info.nbytes > self._identity[0]:
                raise CheckpointError(
                    "file ended inside the embedding table", file=info.file, tensor=info.name
                )
            start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
            # Private mapping: writable as Python sees it (torch wants a writable buffer), never written back.
            self._map = mmap.mmap(
                self._fd, info.offset + info.nbytes - start, access=mmap.ACCESS_COPY, offset=start
            )
        except BaseException:
            os.close(self._fd)
            raise
        self._map.madvise(mmap.MADV_RANDOM)  # one row per token: readahead would read rows nobody asked for
        self.weight = torch.frombuffer(
            self._map,
            dtype=torch_dtype(info.dtype),
            count=self.num_embeddings * self.embedding_dim,
            offset=info.offset - start,
        ).view(self.num_embeddings, self.embedding_dim)
        # transformers' initialisation must leave the file's values alone (they are the loaded weights).
        self.weight._is_hf_initialized = True  # type: ignore[attr-defined]
        self._is_hf_initialized = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._map.closed:
            raise StoreClosedError("the model was closed: its embedding table is unmapped")
        if _identity(os.fstat(self._fd)) != self._identity:
            raise CheckpointError(
                "the checkpoint file changed since it was opened (its embedding table is read from it by row)",
                file=self.file,
                tensor=self.tensor_name,
            )
        rows = F.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        return rows.to(input_ids.device)

    def close(self) -> None:
        """Unmap and close the file (idempotent); the module cannot run afterwards."""
        if self._map.closed:
            return
        self.weight = torch.empty(0, dtype=self.weight.dtype)  # the view's buffer export ends with it
        self._map.close()
        os.close(self._fd)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows read from {os.path.basename(self.file)}"


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_ino, st.st_mtime_ns
