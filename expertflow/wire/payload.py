"""Tensor payloads of the wire protocol: a CPU tensor as an expert reply's frame (no copy), the received frames
as torch tensors (no copy), and the expert checksum that travels with them."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from expertflow.core import SAFETENSORS_CODES, TORCH_DTYPES, ExpertKey, expert_checksum
from expertflow.errors import ChecksumError
from expertflow.wire.protocol import BufferLike, ErrorCode, ExpertReply, MessageError, TensorEntry


def tensor_entry(name: str, tensor: torch.Tensor) -> TensorEntry:
    """A CPU tensor as an ``encode_expert_reply`` entry whose buffer is the tensor's own memory (no copy).

    A non-contiguous tensor is refused: call ``.contiguous()`` first (that copy is then the caller's choice).
    """
    if tensor.device.type != "cpu":
        raise MessageError(ErrorCode.BAD_MESSAGE, f"tensor {name!r} is on {tensor.device}, not on the CPU")
    if not tensor.is_contiguous():
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"tensor {name!r} is not contiguous; call .contiguous() first"
        )
    code = SAFETENSORS_CODES.get(tensor.dtype)
    if code is None:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"tensor {name!r} has dtype {tensor.dtype} with no wire code"
        )
    # A flat uint8 alias of the same storage; numpy exports it through the buffer protocol.
    raw = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    return name, code, tuple(tensor.shape), raw.data


def checksum(key: ExpertKey | tuple[int, int], buffers: Iterable[BufferLike]) -> int:
    """The pack format's expert checksum of ``key``: xxh3-64 seeded by the key, of the buffers' bytes in order."""
    k = key if isinstance(key, ExpertKey) else ExpertKey(key[0], key[1])
    return expert_checksum(k, iter(buffers))


def verify(reply: ExpertReply) -> None:
    """Raise ``ChecksumError`` unless the reply's tensor bytes match its checksum."""
    got = checksum(reply.key, (t.data for t in reply.tensors))
    if got != reply.checksum:
        raise ChecksumError(
            f"expert {reply.key} (request {reply.id}) arrived corrupted: checksum {got:#018x}, "
            f"sender said {reply.checksum:#018x}"
        )


def tensors_to_torch(reply: ExpertReply) -> dict[str, torch.Tensor]:
    """The reply's tensors as torch tensors over the received buffers (no copy), by name in wire order.

    They alias the message frames: keep them read-only. Frames may start at any address, so tensors may be
    unaligned; the CPU kernels accept that, and copying into a device slot realigns them.
    """
    out: dict[str, torch.Tensor] = {}
    for t in reply.tensors:
        dtype = TORCH_DTYPES[t.dtype]  # decode_reply admitted only known codes
        if t.nbytes == 0:
            out[t.name] = torch.empty(t.shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            # torch warns once about read-only buffers (e.g. bytes); expert weights are never written.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(t.data, dtype=torch.uint8)
        out[t.name] = flat.view(dtype).reshape(t.shape)
    return out
