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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from expertflow.core import DTYPE_SIZES, ExpertKey
from expertflow.wire.messages import (  # the vocabulary both ends share, re-exported as the protocol's
    _BAD,
    _U64_MAX,
    DEFAULT_LIMITS,
    MAX_INDEX,
    PROTOCOL_VERSION,
    REPLY_OPS,
    REQUEST_OPS,
    U64,
    UNKNOWN_REQUEST_ID,
    BufferLike,
    DoneReply,
    DType,
    ErrorCode,
    ErrorReply,
    ExpertReply,
    Fingerprint,
    Frames,
    HelloReply,
    Limits,
    MessageError,
    Name,
    Op,
    PongReply,
    Reply,
    Request,
    ServerInfo,
    StatReply,
    TensorEntry,
    WireKey,
    WireTensor,
    _fail,
)

# --- the schema -------------------------------------------------------------------------------------
# Every header is checked against these types by msgspec (strict: no bool for an int, no float for an int,
# no missing or unknown field); what depends on ``Limits`` or spans fields is checked by ``_check_limits``.


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _Bare(_Strict):  # hello, stat, ping, done, pong
    v: int
    op: str
    id: U64


class _Get(_Bare):
    keys: list[WireKey]


class _TensorSpec(_Strict):
    name: Name
    dtype: DType  # type: ignore[valid-type]
    shape: list[U64]
    nbytes: U64


class _Expert(_Bare):
    key: WireKey
    tensors: list[_TensorSpec]
    checksum: U64


class _HelloReply(_Bare):
    fingerprint: Fingerprint
    server: ServerInfo


class _StatReply(_Bare):
    counters: dict[Name, int | float]


class _ErrorBody(_Strict):
    code: ErrorCode
    message: str


class _Error(_Bare):
    error: _ErrorBody
    key: WireKey | msgspec.UnsetType = msgspec.UNSET


_SCHEMA: dict[Op, type[_Bare]] = {
    **dict.fromkeys((Op.HELLO, Op.STAT, Op.PING, Op.DONE, Op.PONG), _Bare),
    Op.GET: _Get,
    Op.EXPERT: _Expert,
    Op.HELLO_REPLY: _HelloReply,
    Op.STAT_REPLY: _StatReply,
    Op.ERROR: _Error,
}
_ENCODER = msgspec.msgpack.Encoder()


def _no_ext(code: int, data: memoryview) -> object:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


_DECODER = msgspec.msgpack.Decoder(ext_hook=_no_ext)


def _typed(head: dict[str, Any], op: Op, rid: int | None) -> Any:
    """``head`` as its op's schema type, or a BAD_MESSAGE naming the first violation (msgspec's path)."""
    try:
        return msgspec.convert(head, _SCHEMA[op], strict=True)
    except msgspec.ValidationError as exc:
        raise _fail(_BAD, f"{op.value}: {_short_text(str(exc))}", rid) from None


def _check_limits(msg: Any, limits: Limits, rid: int) -> None:
    """What the types cannot say: bounds from ``limits`` and rules across fields."""
    if isinstance(msg, _Get):
        if not msg.keys:
            raise _fail(_BAD, "a get needs at least one key", rid)
        if len(msg.keys) > limits.max_keys:
            raise _fail(
                ErrorCode.TOO_MANY_KEYS, f"{len(msg.keys)} keys, at most {limits.max_keys} per request", rid
            )
        if len(set(msg.keys)) != len(msg.keys):
            raise _fail(_BAD, "a get lists the same key twice", rid)
    elif isinstance(msg, _Expert):
        if not 1 <= len(msg.tensors) <= limits.max_tensors:
            raise _fail(
                ErrorCode.TOO_LARGE if msg.tensors else ErrorCode.BAD_MESSAGE,
                f"an expert reply carries 1..{limits.max_tensors} tensors, got {len(msg.tensors)}",
                rid,
            )
        for spec in msg.tensors:
            _check_tensor(spec, limits, rid)
        if len({s.name for s in msg.tensors}) != len(msg.tensors):
            raise _fail(_BAD, "an expert reply names a tensor twice", rid)
    elif isinstance(msg, _HelloReply):
        _check_name(msg.server.version, "'server.version'", limits, rid)
    elif isinstance(msg, _StatReply):
        for name in msg.counters:
            _check_name(name, "a counter name", limits, rid)
    elif isinstance(msg, _Error) and len(msg.error.message) > limits.max_message_len:
        raise _fail(_BAD, f"error message must be a str of at most {limits.max_message_len}", rid)


def _check_tensor(spec: _TensorSpec, limits: Limits, rid: int) -> None:
    name, shape = spec.name, spec.shape
    _check_name(name, "a tensor name", limits, rid)
    if len(shape) > limits.max_ndim:
        raise _fail(_BAD, f"tensor {name!r}: shape must be a list of <= {limits.max_ndim} dims", rid)
    expected = math.prod(shape) * DTYPE_SIZES[spec.dtype]  # Python ints: no overflow
    if max(spec.nbytes, expected) > limits.max_frame_bytes:
        raise _fail(
            ErrorCode.TOO_LARGE,
            f"tensor {name!r}: {max(spec.nbytes, expected)} bytes, at most {limits.max_frame_bytes} per frame",
            rid,
        )
    if spec.nbytes != expected:
        raise _fail(
            _BAD, f"tensor {name!r}: {spec.nbytes} bytes, but {spec.dtype} {shape} needs {expected}", rid
        )
    if any(d > limits.max_frame_bytes for d in shape):  # only an empty tensor gets here: a corrupt header
        raise _fail(_BAD, f"tensor {name!r}: absurd shape {shape}", rid)


def _check_name(x: str, what: str, limits: Limits, rid: int | None) -> None:
    if len(x) > limits.max_name_len:
        raise _fail(_BAD, f"{what} must be a str of 1..{limits.max_name_len} chars", rid)


# --- encoding ---------------------------------------------------------------------------------------


def _encode(op: Op, id: int, limits: Limits = DEFAULT_LIMITS, **fields: Any) -> bytes:
    """A header checked by the same schema and limits the decoder applies, packed."""
    if not _is_u64(id):
        raise _fail(_BAD, f"'id' must be a uint64, got {_short(id)}")
    head = {"v": PROTOCOL_VERSION, "op": op.value, "id": id, **fields}
    _check_limits(_typed(head, op, id), limits, id)
    try:
        data = _ENCODER.encode(head)
    except (OverflowError, TypeError) as exc:  # e.g. a checksum past uint64
        raise _fail(_BAD, f"header cannot be encoded: {exc}", id) from None
    if len(data) > limits.max_header_bytes:
        raise _fail(
            ErrorCode.TOO_LARGE, f"header of {len(data)} bytes, at most {limits.max_header_bytes} allowed", id
        )
    return data


def _wire_key(key: object) -> object:
    return (
        [key.layer, key.expert]
        if isinstance(key, ExpertKey)
        else list(key)
        if isinstance(key, tuple)
        else key
    )


def encode_hello(id: int) -> Frames:
    """``hello``: ask for the server's checkpoint fingerprint and info."""
    return [_encode(Op.HELLO, id)]


def encode_hello_reply(
    id: int, fingerprint: str, server: ServerInfo, limits: Limits = DEFAULT_LIMITS
) -> Frames:
    """The answer to ``hello``."""
    info = (
        msgspec.to_builtins(server) if isinstance(server, ServerInfo) else server
    )  # checked like a decoded one
    return [_encode(Op.HELLO_REPLY, id, limits, fingerprint=fingerprint, server=info)]


def encode_get(
    id: int, keys: Iterable[ExpertKey | tuple[int, int]], limits: Limits = DEFAULT_LIMITS
) -> Frames:
    """``get``: ask for experts; each comes back as its own ``expert`` (or ``error``) reply, then ``done``."""
    return [_encode(Op.GET, id, limits, keys=[_wire_key(k) for k in keys])]


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
    rid = id if _is_u64(id) else None
    payload = [_byte_view(buf, rid) for _, _, _, buf in tensors]
    specs = [
        {"name": name, "dtype": dtype, "shape": list(shape), "nbytes": view.nbytes}
        for (name, dtype, shape, _), view in zip(tensors, payload)
    ]
    head = _encode(Op.EXPERT, id, limits, key=_wire_key(key), tensors=specs, checksum=checksum)
    return [head, *payload]


def encode_done(id: int) -> Frames:
    """``done``: the last reply of a get."""
    return [_encode(Op.DONE, id)]


def encode_stat(id: int) -> Frames:
    """``stat``: ask for the server's counters."""
    return [_encode(Op.STAT, id)]


def encode_stat_reply(
    id: int, counters: Mapping[str, int | float], limits: Limits = DEFAULT_LIMITS
) -> Frames:
    """The answer to ``stat``: named numeric counters."""
    return [
        _encode(
            Op.STAT_REPLY, id, limits, counters=dict(counters) if isinstance(counters, Mapping) else counters
        )
    ]


def encode_ping(id: int) -> Frames:
    """``ping``: liveness check."""
    return [_encode(Op.PING, id)]


def encode_pong(id: int) -> Frames:
    """The answer to ``ping``."""
    return [_encode(Op.PONG, id)]


def encode_error(
    id: int,
    code: ErrorCode,
    message: str,
    key: ExpertKey | tuple[int, int] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Frames:
    """An error reply; with ``key`` it reports one expert of a get (the get goes on). Long messages are cut
    rather than refused, so that reporting an error never fails."""
    rid = id if _is_u64(id) else None
    if not isinstance(code, ErrorCode):
        raise _fail(_BAD, f"error code must be an ErrorCode, got {_kind(code)}", rid)
    if not isinstance(message, str):
        raise _fail(_BAD, f"error message must be a str, got {_kind(message)}", rid)
    body = {"code": code.value, "message": message[: limits.max_message_len]}
    extra = {} if key is None else {"key": _wire_key(key)}
    return [_encode(Op.ERROR, id, limits, error=body, **extra)]


# --- decoding ---------------------------------------------------------------------------------------


def decode_request(frames: Sequence[BufferLike], limits: Limits = DEFAULT_LIMITS) -> Request:
    """A client request from its frames (without the ROUTER's identity frame)."""
    msg, views, rid, op = _decode(frames, limits, REQUEST_OPS)
    if len(views) != 1:
        raise _fail(_BAD, f"a {op.value} request has 1 frame, got {len(views)}", rid)
    return Request(op, rid, tuple(ExpertKey(*k) for k in msg.keys) if isinstance(msg, _Get) else ())


def decode_reply(frames: Sequence[BufferLike], limits: Limits = DEFAULT_LIMITS) -> Reply:
    """A server reply from its frames; an expert reply's tensors are views over ``frames`` (keep them)."""
    msg, views, rid, op = _decode(frames, limits, REPLY_OPS)
    if isinstance(msg, _Expert):
        return _expert_reply(msg, views, limits, rid)
    if len(views) != 1:
        raise _fail(_BAD, f"a {op.value} reply has 1 frame, got {len(views)}", rid)
    if isinstance(msg, _HelloReply):
        return HelloReply(rid, msg.fingerprint, msg.server)
    if isinstance(msg, _StatReply):
        return StatReply(rid, msg.counters)
    if isinstance(msg, _Error):
        key = None if msg.key is msgspec.UNSET else ExpertKey(*msg.key)
        return ErrorReply(rid, msg.error.code, msg.error.message, key)
    return DoneReply(rid) if op is Op.DONE else PongReply(rid)


def _decode(
    frames: Sequence[BufferLike], limits: Limits, allowed: frozenset[Op]
) -> tuple[Any, list[memoryview], int, Op]:
    """The checked header of ``frames`` and their byte views. The envelope (size, msgpack, version, id, op) is
    read first, by hand, so that even a message with a bad version is answered by its id and code."""
    if not isinstance(frames, (list, tuple)):
        raise _fail(_BAD, f"frames must be a list, got {_kind(frames)}")
    if not frames:
        raise _fail(_BAD, "empty message")
    if len(frames) > limits.max_frames:
        raise _fail(ErrorCode.TOO_LARGE, f"{len(frames)} frames, at most {limits.max_frames} allowed")
    views = [_byte_view(f, None) for f in frames]
    if views[0].nbytes > limits.max_header_bytes:
        raise _fail(
            ErrorCode.TOO_LARGE,
            f"header of {views[0].nbytes} bytes, at most {limits.max_header_bytes} allowed",
        )
    try:  # bounded by the length check above; a declared length past the data is refused, never allocated
        head = _DECODER.decode(views[0])
    except Exception as exc:  # DecodeError, RecursionError (deep nesting), ...
        raise _fail(_BAD, f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(head, dict):
        raise _fail(_BAD, f"header must be a map, got {_kind(head)}")
    lenient_id = head["id"] if _is_u64(head.get("id")) else None
    for field in ("v", "op", "id"):
        if field not in head:
            raise _fail(_BAD, f"header has no {field!r}", lenient_id)
    version = head["v"]
    if not _is_int(version):
        raise _fail(_BAD, f"'v' must be an int, got {_kind(version)}", lenient_id)
    if version != PROTOCOL_VERSION:
        raise _fail(
            ErrorCode.BAD_VERSION,
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
            lenient_id,
        )
    if lenient_id is None:
        raise _fail(_BAD, f"'id' must be a uint64, got {_short(head['id'])}")
    rid, name = lenient_id, head["op"]
    if not isinstance(name, str):
        raise _fail(_BAD, f"'op' must be a str, got {_kind(name)}", rid)
    op = Op._value2member_map_.get(name)
    if op is None or op not in allowed:
        raise _fail(ErrorCode.UNKNOWN_OP, f"unknown op {_short(name)}", rid)
    msg = _typed(head, op, rid)  # type: ignore[arg-type]
    _check_limits(msg, limits, rid)
    return msg, views, rid, op  # type: ignore[return-value]


def _expert_reply(msg: _Expert, views: list[memoryview], limits: Limits, rid: int) -> ExpertReply:
    if len(views) != 1 + len(msg.tensors):
        raise _fail(
            _BAD, f"header lists {len(msg.tensors)} tensors but {len(views) - 1} payload frames follow", rid
        )
    tensors = []
    for spec, view in zip(msg.tensors, views[1:]):
        if view.nbytes > limits.max_frame_bytes:
            raise _fail(ErrorCode.TOO_LARGE, f"frame of {view.nbytes} bytes", rid)
        if view.nbytes != spec.nbytes:
            raise _fail(
                _BAD, f"tensor {spec.name!r}: header says {spec.nbytes} bytes, frame has {view.nbytes}", rid
            )
        tensors.append(WireTensor(spec.name, spec.dtype, tuple(spec.shape), view))
    return ExpertReply(rid, ExpertKey(*msg.key), tuple(tensors), msg.checksum)


# --- small helpers ------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return type(x) is int  # bool is an int subclass and never a valid number here


def _is_u64(x: object) -> bool:
    return type(x) is int and 0 <= x <= _U64_MAX


def _kind(x: object) -> str:
    return type(x).__name__


def _short(x: object) -> str:
    text = repr(x) if isinstance(x, (str, int, float, bool, type(None))) else f"<{_kind(x)}>"
    return _short_text(text)


def _short_text(text: str) -> str:
    return text if len(text) <= 160 else text[:157] + "..."


def _byte_view(buf: BufferLike, rid: int | None) -> memoryview:
    try:
        view = memoryview(buf)
    except TypeError:
        raise _fail(_BAD, f"a frame must be a buffer, got {_kind(buf)}", rid) from None
    if not view.c_contiguous:
        raise _fail(_BAD, "a frame buffer must be C-contiguous", rid)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # same memory, seen as flat bytes
    return view


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
]
