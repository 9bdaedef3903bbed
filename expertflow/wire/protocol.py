"""The expert service's wire protocol: a msgpack header frame, then raw tensor frames.

Every message is a ZeroMQ multipart message (the ROUTER's identity envelope is the server's business and is
not part of it). Frame 0 is a msgpack map ``{v, op, id, ...}``; an ``expert`` reply is followed by one raw frame
per tensor, holding exactly that tensor's bytes::

    client -> server   {v, op: "hello" | "stat" | "ping", id}
                       {v, op: "get", id, keys: [[layer, expert], ...]}
    server -> client   {v, op: "hello_reply", id, fingerprint, server: {version, experts, layers, max_keys,
                                                                        max_in_flight}}
                       {v, op: "expert", id, key, tensors: [{name, dtype, shape, nbytes}, ...], checksum}
                         + one frame per tensor
                       {v, op: "done", id}            (after the last expert of a get)
                       {v, op: "stat_reply", id, counters: {name: number}}
                       {v, op: "pong", id}
                       {v, op: "error", id, error: {code, message}[, key]}

Decoders trust nothing: every violation raises :class:`MessageError` (a ``ProtocolError``) whose ``code`` is
the :class:`ErrorCode` a server sends back. Payload frames are never copied: encoders hand back the caller's
buffers (for ``send_multipart(copy=False)``) and decoders hand out memoryviews over the received frames.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeAlias

import msgpack
import torch

from expertflow.core import DTYPE_SIZES, SAFETENSORS_CODES, TORCH_DTYPES, ExpertKey, expert_checksum
from expertflow.errors import ChecksumError, ConfigError, ProtocolError, RemoteError

PROTOCOL_VERSION = 2  # 2: expert checksums are seeded by the expert's key
# A server that cannot read a request's id answers with this id; clients number requests from 1.
UNKNOWN_REQUEST_ID = 0
MAX_INDEX = 2**31 - 1  # bound on layer and expert indices
_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)
_FINGERPRINT = re.compile(r"[0-9a-f]{1,128}")

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


# --- decoded messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A decoded client request; ``keys`` is non-empty exactly for ``get``."""

    op: Op
    id: int
    keys: tuple[ExpertKey, ...] = ()


@dataclass(frozen=True)
class ServerInfo:
    """What a server says about itself in its hello reply."""

    version: str
    experts: int  # expert count over all layers
    layers: tuple[int, ...]  # MoE layer indices served
    max_keys: int
    max_in_flight: int


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


# --- encoding ---------------------------------------------------------------------------------------


def encode_hello(id: int) -> Frames:
    """``hello``: ask for the server's checkpoint fingerprint and info."""
    return [_pack(_base(Op.HELLO, id), DEFAULT_LIMITS)]


def encode_hello_reply(
    id: int, fingerprint: str, server: ServerInfo, limits: Limits = DEFAULT_LIMITS
) -> Frames:
    """The answer to ``hello``."""
    rid = _check_id(id, None)
    _check_fingerprint(fingerprint, rid)
    _check_server_info(server, limits, rid)
    head = _base(Op.HELLO_REPLY, rid)
    head["fingerprint"] = fingerprint
    head["server"] = {
        "version": server.version,
        "experts": server.experts,
        "layers": list(server.layers),
        "max_keys": server.max_keys,
        "max_in_flight": server.max_in_flight,
    }
    return [_pack(head, limits)]


def encode_get(
    id: int, keys: Iterable[ExpertKey | tuple[int, int]], limits: Limits = DEFAULT_LIMITS
) -> Frames:
    """``get``: ask for experts; each comes back as its own ``expert`` (or ``error``) reply, then ``done``."""
    rid = _check_id(id, None)
    wire_keys = [_key_to_wire(k) for k in keys]
    _check_keys(wire_keys, limits, rid)
    head = _base(Op.GET, rid)
    head["keys"] = wire_keys
    return [_pack(head, limits)]


def encode_expert_reply(
    id: int,
    key: ExpertKey | tuple[int, int],
    tensors: Sequence[TensorEntry],
    checksum: int,
    limits: Limits = DEFAULT_LIMITS,
) -> Frames:
    """One expert: a header, then the caller's buffers themselves as payload frames (no copy).

    Each buffer must be C-contiguous and hold exactly ``prod(shape) * itemsize(dtype)`` bytes; the caller
    keeps them unchanged until the send completes. ``checksum`` is :func:`checksum` of the key and the buffers
    (a pack manifest's value can be passed straight through).
    """
    rid = _check_id(id, None)
    wire_key = _key_to_wire(key)
    _check_key(wire_key, rid)
    if not _is_u64(checksum):
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"checksum must be a uint64, got {_kind(checksum)}", request_id=rid
        )
    if not 1 <= len(tensors) <= limits.max_tensors:
        raise MessageError(
            ErrorCode.TOO_LARGE if len(tensors) else ErrorCode.BAD_MESSAGE,
            f"an expert reply carries 1..{limits.max_tensors} tensors, got {len(tensors)}",
            request_id=rid,
        )
    specs: list[dict[str, Any]] = []
    payload: list[memoryview] = []
    for entry in tensors:
        name, dtype, shape, buf = entry
        view = _byte_view(buf, rid)
        spec = {"name": name, "dtype": dtype, "shape": list(shape), "nbytes": view.nbytes}
        _check_tensor_spec(spec, limits, rid)
        specs.append(spec)
        payload.append(view)
    _check_unique_names(specs, rid)
    head = _base(Op.EXPERT, rid)
    head["key"] = wire_key
    head["tensors"] = specs
    head["checksum"] = checksum
    return [_pack(head, limits), *payload]


def encode_done(id: int) -> Frames:
    """``done``: the last reply of a get."""
    return [_pack(_base(Op.DONE, id), DEFAULT_LIMITS)]


def encode_stat(id: int) -> Frames:
    """``stat``: ask for the server's counters."""
    return [_pack(_base(Op.STAT, id), DEFAULT_LIMITS)]


def encode_stat_reply(
    id: int, counters: Mapping[str, int | float], limits: Limits = DEFAULT_LIMITS
) -> Frames:
    """The answer to ``stat``: named numeric counters."""
    rid = _check_id(id, None)
    _check_counters(counters, limits, rid)
    head = _base(Op.STAT_REPLY, rid)
    head["counters"] = dict(counters)
    return [_pack(head, limits)]


def encode_ping(id: int) -> Frames:
    """``ping``: liveness check."""
    return [_pack(_base(Op.PING, id), DEFAULT_LIMITS)]


def encode_pong(id: int) -> Frames:
    """The answer to ``ping``."""
    return [_pack(_base(Op.PONG, id), DEFAULT_LIMITS)]


def encode_error(
    id: int,
    code: ErrorCode,
    message: str,
    key: ExpertKey | tuple[int, int] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Frames:
    """An error reply; with ``key`` it reports one expert of a get (the get goes on). Long messages are cut
    rather than refused, so that reporting an error never fails."""
    rid = _check_id(id, None)
    if not isinstance(code, ErrorCode):
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"error code must be an ErrorCode, got {_kind(code)}", request_id=rid
        )
    if not isinstance(message, str):
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"error message must be a str, got {_kind(message)}", request_id=rid
        )
    head = _base(Op.ERROR, rid)
    head["error"] = {"code": code.value, "message": message[: limits.max_message_len]}
    if key is not None:
        wire_key = _key_to_wire(key)
        _check_key(wire_key, rid)
        head["key"] = wire_key
    return [_pack(head, limits)]


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


# --- decoding ---------------------------------------------------------------------------------------


def decode_request(frames: Sequence[BufferLike], limits: Limits = DEFAULT_LIMITS) -> Request:
    """A client request from its frames (without the ROUTER's identity frame)."""
    head, views, rid, op = _decode_header(frames, limits, REQUEST_OPS)
    if len(views) != 1:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"a {op.value} request has 1 frame, got {len(views)}", request_id=rid
        )
    if op is Op.GET:
        _check_fields(head, {"keys"}, op, rid)
        keys = head["keys"]
        _check_keys(keys, limits, rid)
        return Request(op, rid, tuple(ExpertKey(k[0], k[1]) for k in keys))
    _check_fields(head, set(), op, rid)
    return Request(op, rid)


def decode_reply(frames: Sequence[BufferLike], limits: Limits = DEFAULT_LIMITS) -> Reply:
    """A server reply from its frames; an expert reply's tensors are views over ``frames`` (keep them)."""
    head, views, rid, op = _decode_header(frames, limits, REPLY_OPS)
    if op is Op.EXPERT:
        return _decode_expert(head, views, limits, rid)
    if len(views) != 1:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"a {op.value} reply has 1 frame, got {len(views)}", request_id=rid
        )
    if op is Op.HELLO_REPLY:
        _check_fields(head, {"fingerprint", "server"}, op, rid)
        _check_fingerprint(head["fingerprint"], rid)
        return HelloReply(rid, head["fingerprint"], _decode_server_info(head["server"], limits, rid))
    if op is Op.STAT_REPLY:
        _check_fields(head, {"counters"}, op, rid)
        _check_counters(head["counters"], limits, rid)
        return StatReply(rid, dict(head["counters"]))
    if op is Op.ERROR:
        _check_fields(head, {"error"}, op, rid, optional=frozenset({"key"}))
        return _decode_error(head, limits, rid)
    _check_fields(head, set(), op, rid)
    return DoneReply(rid) if op is Op.DONE else PongReply(rid)


def _decode_header(
    frames: Sequence[BufferLike], limits: Limits, allowed: frozenset[Op]
) -> tuple[dict[str, Any], list[memoryview], int, Op]:
    if not isinstance(frames, (list, tuple)):
        raise MessageError(ErrorCode.BAD_MESSAGE, f"frames must be a list, got {_kind(frames)}")
    if not frames:
        raise MessageError(ErrorCode.BAD_MESSAGE, "empty message")
    if len(frames) > limits.max_frames:
        raise MessageError(ErrorCode.TOO_LARGE, f"{len(frames)} frames, at most {limits.max_frames} allowed")
    views = [_byte_view(f, None) for f in frames]
    if views[0].nbytes > limits.max_header_bytes:
        raise MessageError(
            ErrorCode.TOO_LARGE,
            f"header of {views[0].nbytes} bytes, at most {limits.max_header_bytes} allowed",
        )
    # The length check above bounds the whole header (as an Unpacker's max_buffer_size would); the per-object
    # bounds stop a declared length from allocating more than the header could hold, and ext types are refused.
    try:
        head = msgpack.unpackb(
            views[0],
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_header_bytes,
            max_map_len=limits.max_header_bytes // 2,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, TypeError, UnicodeDecodeError and its own kinds
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"header is not valid msgpack ({type(exc).__name__})"
        ) from None
    if not isinstance(head, dict):
        raise MessageError(ErrorCode.BAD_MESSAGE, f"header must be a map, got {_kind(head)}")
    # Read the id first (leniently) so that even a message with a bad version can be answered by id.
    raw_id = head.get("id")
    lenient_id = raw_id if _is_u64(raw_id) else None
    for field in ("v", "op", "id"):
        if field not in head:
            raise MessageError(ErrorCode.BAD_MESSAGE, f"header has no {field!r}", request_id=lenient_id)
    version = head["v"]
    if not _is_int(version):
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"'v' must be an int, got {_kind(version)}", request_id=lenient_id
        )
    if version != PROTOCOL_VERSION:
        raise MessageError(
            ErrorCode.BAD_VERSION,
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
            request_id=lenient_id,
        )
    rid = _check_id(raw_id, None)
    op_name = head["op"]
    if not isinstance(op_name, str):
        raise MessageError(ErrorCode.BAD_MESSAGE, f"'op' must be a str, got {_kind(op_name)}", request_id=rid)
    try:
        op = Op(op_name)
    except ValueError:
        op = None
    if op is None or op not in allowed:
        raise MessageError(ErrorCode.UNKNOWN_OP, f"unknown op {_short(op_name)}", request_id=rid)
    return head, views, rid, op


def _decode_expert(head: dict[str, Any], views: list[memoryview], limits: Limits, rid: int) -> ExpertReply:
    _check_fields(head, {"key", "tensors", "checksum"}, Op.EXPERT, rid)
    key = head["key"]
    _check_key(key, rid)
    if not _is_u64(head["checksum"]):
        raise MessageError(ErrorCode.BAD_MESSAGE, "'checksum' must be a uint64", request_id=rid)
    specs = head["tensors"]
    if not isinstance(specs, list):
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"'tensors' must be a list, got {_kind(specs)}", request_id=rid
        )
    if not 1 <= len(specs) <= limits.max_tensors:
        raise MessageError(
            ErrorCode.TOO_LARGE if specs else ErrorCode.BAD_MESSAGE,
            f"an expert reply carries 1..{limits.max_tensors} tensors, got {len(specs)}",
            request_id=rid,
        )
    for spec in specs:
        _check_tensor_spec(spec, limits, rid)
    _check_unique_names(specs, rid)
    if len(views) != 1 + len(specs):
        raise MessageError(
            ErrorCode.BAD_MESSAGE,
            f"header lists {len(specs)} tensors but {len(views) - 1} payload frames follow",
            request_id=rid,
        )
    tensors = []
    for spec, view in zip(specs, views[1:]):
        if view.nbytes > limits.max_frame_bytes:
            raise MessageError(ErrorCode.TOO_LARGE, f"frame of {view.nbytes} bytes", request_id=rid)
        if view.nbytes != spec["nbytes"]:
            raise MessageError(
                ErrorCode.BAD_MESSAGE,
                f"tensor {spec['name']!r}: header says {spec['nbytes']} bytes, frame has {view.nbytes}",
                request_id=rid,
            )
        tensors.append(WireTensor(spec["name"], spec["dtype"], tuple(spec["shape"]), view))
    return ExpertReply(rid, ExpertKey(key[0], key[1]), tuple(tensors), head["checksum"])


def _decode_server_info(info: object, limits: Limits, rid: int) -> ServerInfo:
    if not isinstance(info, dict):
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"'server' must be a map, got {_kind(info)}", request_id=rid
        )
    expected = {"version", "experts", "layers", "max_keys", "max_in_flight"}
    if set(info) != expected:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"'server' must have exactly {sorted(expected)}", request_id=rid
        )
    layers = info["layers"]
    if not isinstance(layers, list):
        raise MessageError(ErrorCode.BAD_MESSAGE, "'server.layers' must be a list", request_id=rid)
    server = ServerInfo(
        info["version"], info["experts"], tuple(layers), info["max_keys"], info["max_in_flight"]
    )
    _check_server_info(server, limits, rid)
    return server


def _decode_error(head: dict[str, Any], limits: Limits, rid: int) -> ErrorReply:
    err = head["error"]
    if not isinstance(err, dict) or set(err) != {"code", "message"}:
        raise MessageError(ErrorCode.BAD_MESSAGE, "'error' must be a map {code, message}", request_id=rid)
    code, message = err["code"], err["message"]
    if not isinstance(code, str) or code not in ErrorCode._value2member_map_:
        raise MessageError(ErrorCode.BAD_MESSAGE, f"unknown error code {_short(code)}", request_id=rid)
    if not isinstance(message, str) or len(message) > limits.max_message_len:
        raise MessageError(
            ErrorCode.BAD_MESSAGE,
            f"error message must be a str of at most {limits.max_message_len}",
            request_id=rid,
        )
    key = None
    if "key" in head:
        _check_key(head["key"], rid)
        key = ExpertKey(head["key"][0], head["key"][1])
    return ErrorReply(rid, ErrorCode(code), message, key)


# --- payload helpers ----------------------------------------------------------------------------------


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


# --- validation -------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass and never a valid number here


def _is_u64(x: object) -> bool:
    return type(x) is int and 0 <= x <= _U64_MAX


def _kind(x: object) -> str:
    return type(x).__name__


def _short(x: object) -> str:
    text = repr(x) if isinstance(x, (str, int, float, bool, type(None))) else f"<{_kind(x)}>"
    return text if len(text) <= 64 else text[:61] + "..."


def _check_id(x: object, rid: int | None) -> int:
    if not _is_u64(x):
        raise MessageError(ErrorCode.BAD_MESSAGE, f"'id' must be a uint64, got {_short(x)}", request_id=rid)
    return x  # type: ignore[return-value]


def _base(op: Op, id: int) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "op": op.value, "id": _check_id(id, None)}


def _pack(head: dict[str, Any], limits: Limits) -> bytes:
    try:
        data = msgpack.packb(head, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"header cannot be encoded: {exc}", request_id=head["id"]
        ) from None
    if len(data) > limits.max_header_bytes:
        raise MessageError(
            ErrorCode.TOO_LARGE,
            f"header of {len(data)} bytes, at most {limits.max_header_bytes} allowed",
            request_id=head["id"],
        )
    return data


def _byte_view(buf: BufferLike, rid: int | None) -> memoryview:
    try:
        view = memoryview(buf)
    except TypeError:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"a frame must be a buffer, got {_kind(buf)}", request_id=rid
        ) from None
    if not view.c_contiguous:
        raise MessageError(ErrorCode.BAD_MESSAGE, "a frame buffer must be C-contiguous", request_id=rid)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # same memory, seen as flat bytes
    return view


def _key_to_wire(key: object) -> list[object]:
    if isinstance(key, ExpertKey):
        return [key.layer, key.expert]
    if isinstance(key, (tuple, list)):
        return list(key)
    return [key]  # rejected by _check_key with a precise message


def _check_key(key: object, rid: int | None) -> None:
    if (
        not isinstance(key, list) or len(key) != 2 or not all(_is_int(i) and 0 <= i <= MAX_INDEX for i in key)  # type: ignore[operator]
    ):
        raise MessageError(
            ErrorCode.BAD_MESSAGE,
            f"a key must be [layer, expert] with ints in 0..{MAX_INDEX}",
            request_id=rid,
        )


def _check_keys(keys: object, limits: Limits, rid: int | None) -> None:
    if not isinstance(keys, list):
        raise MessageError(ErrorCode.BAD_MESSAGE, f"'keys' must be a list, got {_kind(keys)}", request_id=rid)
    if not keys:
        raise MessageError(ErrorCode.BAD_MESSAGE, "a get needs at least one key", request_id=rid)
    if len(keys) > limits.max_keys:
        raise MessageError(
            ErrorCode.TOO_MANY_KEYS,
            f"{len(keys)} keys, at most {limits.max_keys} per request",
            request_id=rid,
        )
    for key in keys:
        _check_key(key, rid)
    if len({(k[0], k[1]) for k in keys}) != len(keys):
        raise MessageError(ErrorCode.BAD_MESSAGE, "a get lists the same key twice", request_id=rid)


def _check_name(x: object, what: str, limits: Limits, rid: int | None) -> None:
    if not isinstance(x, str) or not 1 <= len(x) <= limits.max_name_len:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"{what} must be a str of 1..{limits.max_name_len} chars", request_id=rid
        )


def _check_tensor_spec(spec: object, limits: Limits, rid: int | None) -> None:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape", "nbytes"}:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, "a tensor entry must be a map {name, dtype, shape, nbytes}", request_id=rid
        )
    name = spec["name"]
    _check_name(name, "a tensor name", limits, rid)
    dtype, shape, nbytes = spec["dtype"], spec["shape"], spec["nbytes"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"tensor {name!r}: unknown dtype {_short(dtype)}", request_id=rid
        )
    if not isinstance(shape, (list, tuple)) or len(shape) > limits.max_ndim:
        raise MessageError(
            ErrorCode.BAD_MESSAGE,
            f"tensor {name!r}: shape must be a list of <= {limits.max_ndim} dims",
            request_id=rid,
        )
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise MessageError(
            ErrorCode.BAD_MESSAGE,
            f"tensor {name!r}: dims must be ints >= 0, got {_short(str(shape))}",
            request_id=rid,
        )
    if not _is_int(nbytes) or nbytes < 0:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"tensor {name!r}: nbytes must be an int >= 0", request_id=rid
        )
    expected = (
        math.prod(shape) * DTYPE_SIZES[dtype]
    )  # Python ints: no overflow for any shape msgpack can carry
    if max(nbytes, expected) > limits.max_frame_bytes:
        raise MessageError(
            ErrorCode.TOO_LARGE,
            f"tensor {name!r}: {max(nbytes, expected)} bytes, at most {limits.max_frame_bytes} per frame",
            request_id=rid,
        )
    if nbytes != expected:
        raise MessageError(
            ErrorCode.BAD_MESSAGE,
            f"tensor {name!r}: {nbytes} bytes, but {dtype} {list(shape)} needs {expected}",
            request_id=rid,
        )
    if any(d > limits.max_frame_bytes for d in shape):
        # Only an empty tensor gets here: a dim no frame could hold is a corrupt header, not data.
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"tensor {name!r}: absurd shape {list(shape)}", request_id=rid
        )


def _check_unique_names(specs: list[dict[str, Any]], rid: int | None) -> None:
    if len({s["name"] for s in specs}) != len(specs):
        raise MessageError(ErrorCode.BAD_MESSAGE, "an expert reply names a tensor twice", request_id=rid)


def _check_fields(
    head: dict[str, Any], required: set[str], op: Op, rid: int, optional: frozenset[str] = frozenset()
) -> None:
    present = set(head) - {"v", "op", "id"}
    missing = required - present
    if missing:
        raise MessageError(ErrorCode.BAD_MESSAGE, f"{op.value} needs {sorted(missing)}", request_id=rid)
    extra = present - required - optional
    if extra:
        names = ", ".join(_short(k) for k in sorted(extra, key=str)[:4])
        raise MessageError(ErrorCode.BAD_MESSAGE, f"{op.value} has unknown fields: {names}", request_id=rid)


def _check_fingerprint(x: object, rid: int | None) -> None:
    if not isinstance(x, str) or _FINGERPRINT.fullmatch(x) is None:
        raise MessageError(
            ErrorCode.BAD_MESSAGE, "'fingerprint' must be 1..128 lowercase hex digits", request_id=rid
        )


def _check_server_info(s: ServerInfo, limits: Limits, rid: int | None) -> None:
    _check_name(s.version, "'server.version'", limits, rid)
    for name in ("experts", "max_keys", "max_in_flight"):
        value = getattr(s, name)
        if not _is_int(value) or not 0 <= value <= _U64_MAX:
            raise MessageError(ErrorCode.BAD_MESSAGE, f"'server.{name}' must be an int >= 0", request_id=rid)
    if not all(_is_int(i) and 0 <= i <= MAX_INDEX for i in s.layers):
        raise MessageError(ErrorCode.BAD_MESSAGE, "'server.layers' must be layer indices", request_id=rid)


def _check_counters(counters: object, limits: Limits, rid: int | None) -> None:
    if not isinstance(counters, Mapping):
        raise MessageError(
            ErrorCode.BAD_MESSAGE, f"'counters' must be a map, got {_kind(counters)}", request_id=rid
        )
    for name, value in counters.items():
        _check_name(name, "a counter name", limits, rid)
        ok = (_is_int(value) and _I64_MIN <= value <= _U64_MAX) or type(value) is float
        if not ok:
            raise MessageError(ErrorCode.BAD_MESSAGE, f"counter {name!r} must be a number", request_id=rid)


__all__ = [
    "DEFAULT_LIMITS",
    "MAX_INDEX",
    "PROTOCOL_VERSION",
    "REPLY_OPS",
    "REQUEST_OPS",
    "UNKNOWN_REQUEST_ID",
    "DoneReply",
    "ErrorCode",
    "ErrorReply",
    "ExpertReply",
    "Frames",
    "HelloReply",
    "Limits",
    "MessageError",
    "Op",
    "PongReply",
    "Reply",
    "Request",
    "ServerInfo",
    "StatReply",
    "TensorEntry",
    "WireTensor",
    "checksum",
    "decode_reply",
    "decode_request",
    "encode_done",
    "encode_error",
    "encode_expert_reply",
    "encode_get",
    "encode_hello",
    "encode_hello_reply",
    "encode_ping",
    "encode_pong",
    "encode_stat",
    "encode_stat_reply",
    "tensor_entry",
    "tensors_to_torch",
    "verify",
]
