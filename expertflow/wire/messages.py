"""The messages of the expert service's wire protocol as both ends see them: ops, error codes, limits, the
decoded requests and replies, and the value types their headers are made of. The encoding and the checks are
:mod:`expertflow.wire.protocol`'s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

import msgspec

from expertflow.core import DTYPE_SIZES, ExpertKey
from expertflow.errors import ConfigError, ProtocolError, RemoteError

PROTOCOL_VERSION = 2  # 2: expert checksums are seeded by the expert's key
# A server that cannot read a request's id answers with this id; clients number requests from 1.
UNKNOWN_REQUEST_ID = 0
MAX_INDEX = 2**31 - 1  # bound on layer and expert indices
_U64_MAX = 2**64 - 1

# Anything exporting the buffer protocol: bytes, bytearray, memoryview, numpy arrays, zmq.Frame.
BufferLike: TypeAlias = Any
Frames: TypeAlias = list[bytes | memoryview]


class Op(str, Enum):
    """Message types. The first four are requests, the rest replies."""

    HELLO = "hello"
    GET = "get"
    STAT = "stat"
    PING = "ping"
    HELLO_REPLY = "hello_reply"
    EXPERT = "expert"
    DONE = "done"
    STAT_REPLY = "stat_reply"
    PONG = "pong"
    ERROR = "error"


REQUEST_OPS = frozenset({Op.HELLO, Op.GET, Op.STAT, Op.PING})
REPLY_OPS = frozenset(set(Op) - REQUEST_OPS)


class ErrorCode(str, Enum):
    """Why a request failed; sent as the string value in ``error.code``."""

    BAD_MESSAGE = "BAD_MESSAGE"
    BAD_VERSION = "BAD_VERSION"
    UNKNOWN_OP = "UNKNOWN_OP"
    TOO_LARGE = "TOO_LARGE"
    TOO_MANY_KEYS = "TOO_MANY_KEYS"
    UNKNOWN_EXPERT = "UNKNOWN_EXPERT"
    BUSY = "BUSY"
    INTERNAL = "INTERNAL"
    UNAUTHORIZED = "UNAUTHORIZED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    CHECKPOINT_CHANGED = "CHECKPOINT_CHANGED"  # the daemon's files changed on disk since it announced them


class MessageError(ProtocolError):
    """A message violates the protocol. ``code`` is the error to answer with; ``request_id`` is the
    offending request's id when it could be read (else None: answer with ``UNKNOWN_REQUEST_ID``)."""

    def __init__(self, code: ErrorCode, message: str, *, request_id: int | None = None) -> None:
        super().__init__(f"[{code.value}] {message}")
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True)
class Limits:
    """Bounds both ends enforce. A server should also set ``zmq.MAXMSGSIZE`` to ``max_header_bytes`` on its
    ROUTER socket (requests never carry payload frames), so an oversized request is dropped by libzmq before
    it is ever buffered."""

    max_header_bytes: int = 64 * 1024
    max_keys: int = 1024  # keys per get request
    max_frames: int = 65  # header + tensors of one expert
    max_frame_bytes: int = 2 * 1024**3
    max_in_flight: int = 64  # outstanding requests per client (enforced by the server: BUSY)
    max_ndim: int = 8
    max_name_len: int = 256  # tensor names, counter names, version strings
    max_message_len: int = 1024  # error messages (longer ones are cut when encoded)

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if type(value) is not int or value < 1:
                raise ConfigError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_frames < 2:
            raise ConfigError("Limits.max_frames must be >= 2 (a header and at least one tensor)")
        if self.max_header_bytes < 256:
            raise ConfigError("Limits.max_header_bytes must be >= 256")

    @property
    def max_tensors(self) -> int:
        """Tensors one expert reply may carry."""
        return self.max_frames - 1


DEFAULT_LIMITS = Limits()
_BAD = ErrorCode.BAD_MESSAGE


def _fail(code: ErrorCode, message: str, rid: int | None = None) -> MessageError:
    return MessageError(code, message, request_id=rid)


# --- decoded messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A decoded client request; ``keys`` is non-empty exactly for ``get``."""

    op: Op
    id: int
    keys: tuple[ExpertKey, ...] = ()


@dataclass(frozen=True)
class HelloReply:
    op: ClassVar[Op] = Op.HELLO_REPLY
    id: int
    fingerprint: str  # ExpertLayout.fingerprint() of the served checkpoint
    server: ServerInfo


@dataclass(frozen=True)
class WireTensor:
    """One tensor of an expert reply; ``data`` is a byte view over the received frame (no copy)."""

    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass(frozen=True)
class ExpertReply:
    op: ClassVar[Op] = Op.EXPERT
    id: int
    key: ExpertKey
    tensors: tuple[WireTensor, ...]
    checksum: int  # checksum(key, tensors' bytes in order); check with verify()


@dataclass(frozen=True)
class DoneReply:
    op: ClassVar[Op] = Op.DONE
    id: int


@dataclass(frozen=True)
class StatReply:
    op: ClassVar[Op] = Op.STAT_REPLY
    id: int
    counters: Mapping[str, int | float]


@dataclass(frozen=True)
class PongReply:
    op: ClassVar[Op] = Op.PONG
    id: int


@dataclass(frozen=True)
class ErrorReply:
    op: ClassVar[Op] = Op.ERROR
    id: int
    code: ErrorCode
    message: str
    key: ExpertKey | None = None  # set when one key of a get failed

    def to_exception(self, address: str | None = None) -> RemoteError:
        """The typed error a client raises for this reply."""
        text = self.message if self.key is None else f"{self.message} (expert {self.key})"
        return RemoteError(text, code=self.code.value, address=address)


Reply: TypeAlias = HelloReply | ExpertReply | DoneReply | StatReply | PongReply | ErrorReply

# One tensor handed to encode_expert_reply: (name, safetensors dtype code, shape, contiguous buffer).
TensorEntry: TypeAlias = tuple[str, str, Sequence[int], BufferLike]


# --- the values headers are made of -------------------------------------------------------------------

Index = Annotated[int, msgspec.Meta(ge=0, le=MAX_INDEX)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack's own range bounds it above
WireKey = tuple[Index, Index]  # [layer, expert]
Name = Annotated[str, msgspec.Meta(min_length=1)]
DType = Literal[tuple(DTYPE_SIZES)]  # type: ignore[valid-type]
Fingerprint = Annotated[str, msgspec.Meta(pattern=r"\A[0-9a-f]{1,128}\Z")]


class ServerInfo(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a server says about itself in its hello reply."""

    version: Name
    experts: U64  # expert count over all layers
    layers: tuple[Index, ...]  # MoE layer indices served
    max_keys: U64
    max_in_flight: U64
