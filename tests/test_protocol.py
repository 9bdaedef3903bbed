"""The expert service's wire protocol: round trips, every malformed case, fuzzing, checksums, real sockets."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
import zmq

from expertflow.core import ExpertKey, expert_checksum
from expertflow.errors import ChecksumError, ConfigError, ProtocolError, RemoteError
from expertflow.wire import payload as pl
from expertflow.wire import protocol as p
from expertflow.wire.protocol import ErrorCode, Limits, MessageError, Op

SEED = 20240611


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bytes of every bit pattern (NaNs included) reinterpreted as ``dtype``."""
    numel = 1
    for d in shape:
        numel *= d
    if dtype is torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen, dtype=torch.uint8).bool().reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def expert_frames(tensors: dict[str, torch.Tensor], id: int = 9, key: tuple[int, int] = (3, 5)) -> list[Any]:
    entries = [pl.tensor_entry(name, t) for name, t in tensors.items()]
    return p.encode_expert_reply(id, key, entries, pl.checksum(key, (e[3] for e in entries)))


def mixtral_expert(gen: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    return {
        "w1.weight": make_tensor(dtype, (16, 8), gen),
        "w3.weight": make_tensor(dtype, (16, 8), gen),
        "w2.weight": make_tensor(dtype, (8, 16), gen),
    }


def header(frames: list[Any]) -> dict[str, Any]:
    return msgpack.unpackb(frames[0])


def packed(head: object, *payload: Any) -> list[Any]:
    return [msgpack.packb(head, use_bin_type=True), *payload]


def expect_code(code: ErrorCode, fn: Callable[..., object], *args: Any, **kwargs: Any) -> MessageError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, MessageError)
    assert info.value.code is code, str(info.value)
    return info.value


# --- round trips ------------------------------------------------------------------------------------

DTYPES = [
    torch.bfloat16,
    torch.float32,
    torch.float16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float64,
    torch.int64,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (4, 5), (2, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_expert_reply_round_trips_every_dtype_and_shape_without_copies(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(SEED)
    src = {"a": make_tensor(dtype, shape, gen), "b": make_tensor(torch.float32, (2, 3), gen)}
    frames = expert_frames(src)
    assert len(frames) == 1 + len(src)

    reply = p.decode_reply(frames)
    assert isinstance(reply, p.ExpertReply)
    assert reply.key == ExpertKey(3, 5) and reply.id == 9
    assert [t.name for t in reply.tensors] == ["a", "b"]
    assert reply.tensors[0].shape == shape
    pl.verify(reply)
    out = pl.tensors_to_torch(reply)
    assert list(out) == ["a", "b"]
    for name, t in src.items():
        assert same_bits(out[name], t)
        if t.numel():
            # Encoder and decoder both worked on views: the decoded tensor is the source's own memory.
            assert out[name].data_ptr() == t.data_ptr()


def test_scalar_shape_travels_as_an_empty_list_and_comes_back_zero_dimensional() -> None:
    src = {"scale": torch.tensor(2.5, dtype=torch.bfloat16)}
    frames = expert_frames(src)
    assert header(frames)["tensors"][0]["shape"] == []
    assert header(frames)["tensors"][0]["nbytes"] == 2
    out = pl.tensors_to_torch(p.decode_reply([bytes(f) for f in frames]))
    assert out["scale"].dim() == 0 and out["scale"].item() == 2.5


def test_multi_tensor_expert_has_one_frame_per_tensor_in_order() -> None:
    gen = torch.Generator().manual_seed(SEED)
    src = mixtral_expert(gen)
    frames = expert_frames(src)
    assert len(frames) == 4
    assert [t["name"] for t in header(frames)["tensors"]] == list(src)
    assert [bytes(f) for f in frames[1:]] == [t.view(torch.uint8).numpy().tobytes() for t in src.values()]
    reply = p.decode_reply([bytes(f) for f in frames])  # as if received: fresh buffers
    assert isinstance(reply, p.ExpertReply)
    pl.verify(reply)
    out = pl.tensors_to_torch(reply)
    assert all(same_bits(out[n], t) for n, t in src.items())


def test_non_contiguous_tensor_is_refused_until_the_caller_makes_it_contiguous() -> None:
    gen = torch.Generator().manual_seed(SEED)
    base = make_tensor(torch.bfloat16, (6, 8), gen)
    transposed = base.t()
    expect_code(ErrorCode.BAD_MESSAGE, pl.tensor_entry, "w", transposed)
    frames = expert_frames({"w": transposed.contiguous()})
    out = pl.tensors_to_torch(p.decode_reply([bytes(f) for f in frames]))
    assert out["w"].shape == (8, 6)
    assert torch.equal(out["w"], transposed)


def test_non_contiguous_raw_buffer_is_refused_by_the_encoder() -> None:
    import numpy as np

    arr = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_expert_reply, 1, (0, 0), [("w", "F32", (4, 3), arr)], 0)


def test_payload_frames_are_the_callers_buffers() -> None:
    buf = bytearray(range(12))
    frames = p.encode_expert_reply(1, (0, 1), [("w", "U8", (3, 4), buf)], pl.checksum((0, 1), [buf]))
    buf[0] = 200  # a copy would not see this
    assert bytes(frames[1])[0] == 200
    reply = p.decode_reply(frames)
    assert isinstance(reply, p.ExpertReply)
    assert pl.tensors_to_torch(reply)["w"][0, 0].item() == 200


def test_unaligned_frames_still_give_correct_tensors() -> None:
    values = torch.arange(6, dtype=torch.float32)
    raw = bytearray(1) + bytearray(values.numpy().tobytes())
    view = memoryview(raw)[1:]  # starts at an odd address
    frames = [
        p.encode_expert_reply(2, (1, 1), [("w", "F32", (2, 3), view)], pl.checksum((1, 1), [view]))[0],
        view,
    ]
    out = pl.tensors_to_torch(p.decode_reply(frames))
    assert torch.equal(out["w"], values.reshape(2, 3))


def test_float8_tensors_round_trip() -> None:
    gen = torch.Generator().manual_seed(SEED)
    src = {
        "e4m3": make_tensor(torch.float8_e4m3fn, (4, 4), gen),
        "e5m2": make_tensor(torch.float8_e5m2, (3,), gen),
    }
    out = pl.tensors_to_torch(p.decode_reply([bytes(f) for f in expert_frames(src)]))
    assert all(same_bits(out[n], t) for n, t in src.items())


def test_requests_round_trip() -> None:
    assert p.decode_request(p.encode_hello(1)) == p.Request(Op.HELLO, 1)
    assert p.decode_request(p.encode_stat(2)) == p.Request(Op.STAT, 2)
    assert p.decode_request(p.encode_ping(2**64 - 1)) == p.Request(Op.PING, 2**64 - 1)
    keys = [ExpertKey(0, 7), (3, 1), ExpertKey(p.MAX_INDEX, 0)]
    req = p.decode_request(p.encode_get(4, keys))
    assert req == p.Request(Op.GET, 4, (ExpertKey(0, 7), ExpertKey(3, 1), ExpertKey(p.MAX_INDEX, 0)))
    many = [(i // 8, i % 8) for i in range(p.DEFAULT_LIMITS.max_keys)]
    assert len(p.decode_request(p.encode_get(5, many)).keys) == p.DEFAULT_LIMITS.max_keys


def test_small_replies_round_trip() -> None:
    info = p.ServerInfo("0.1.0", experts=64, layers=(1, 2, 3), max_keys=1024, max_in_flight=64)
    hello = p.decode_reply(p.encode_hello_reply(1, "0123456789abcdef" * 2, info))
    assert hello == p.HelloReply(1, "0123456789abcdef" * 2, info)
    assert p.decode_reply(p.encode_done(2)) == p.DoneReply(2)
    assert p.decode_reply(p.encode_pong(3)) == p.PongReply(3)
    counters = {"requests": 10, "bytes_sent": 2**40, "gbps": 1.25, "negative": -3}
    assert p.decode_reply(p.encode_stat_reply(4, counters)) == p.StatReply(4, counters)
    err = p.decode_reply(p.encode_error(5, ErrorCode.BUSY, "too many requests in flight"))
    assert err == p.ErrorReply(5, ErrorCode.BUSY, "too many requests in flight", None)
    keyed = p.decode_reply(p.encode_error(6, ErrorCode.UNKNOWN_EXPERT, "no such expert", key=(2, 99)))
    assert keyed == p.ErrorReply(6, ErrorCode.UNKNOWN_EXPERT, "no such expert", ExpertKey(2, 99))


def test_every_error_code_round_trips() -> None:
    for code in ErrorCode:
        reply = p.decode_reply(p.encode_error(1, code, code.value.lower()))
        assert isinstance(reply, p.ErrorReply) and reply.code is code


def test_error_reply_becomes_a_remote_error_naming_code_key_and_server() -> None:
    reply = p.decode_reply(p.encode_error(6, ErrorCode.UNKNOWN_EXPERT, "no such expert", key=(2, 99)))
    assert isinstance(reply, p.ErrorReply)
    exc = reply.to_exception("tcp://10.0.0.2:7000")
    assert isinstance(exc, RemoteError)
    assert exc.code == "UNKNOWN_EXPERT" and exc.address == "tcp://10.0.0.2:7000"
    assert "L2.E99" in str(exc)


def test_long_error_messages_are_cut_not_refused() -> None:
    reply = p.decode_reply(p.encode_error(1, ErrorCode.INTERNAL, "x" * 100_000))
    assert isinstance(reply, p.ErrorReply)
    assert reply.message == "x" * p.DEFAULT_LIMITS.max_message_len


# --- checksums ----------------------------------------------------------------------------------------


def test_checksum_equals_the_pack_formats_expert_checksum() -> None:
    parts = [b"gate", b"", bytearray(b"up" * 100), memoryview(b"down")]
    key = ExpertKey(3, 5)
    assert pl.checksum((3, 5), parts) == expert_checksum(key, parts)
    assert pl.checksum(key, parts) == expert_checksum(key, b"gate" + b"up" * 100 + b"down")


def test_a_checksum_is_bound_to_its_expert() -> None:
    """The same bytes under another key, even a transposed one, give another checksum: moving a recorded
    checksum to another expert (a swapped manifest entry, a relabelled reply) can never verify."""
    data = b"the same expert bytes" * 10
    values = {expert_checksum(ExpertKey(layer, expert), data) for layer in range(4) for expert in range(4)}
    assert len(values) == 16


def test_a_reply_relabelled_to_another_key_fails_verification() -> None:
    gen = torch.Generator().manual_seed(0)
    frames = expert_frames(mixtral_expert(gen), key=(3, 5))
    head = msgpack.unpackb(bytes(frames[0]))
    head["key"] = [3, 6]
    with pytest.raises(ChecksumError):
        pl.verify(p.decode_reply([msgpack.packb(head), *frames[1:]]))


@pytest.mark.parametrize("tensor_index", [0, 1, 2])
def test_one_corrupted_payload_byte_is_detected_by_verify(tensor_index: int) -> None:
    gen = torch.Generator().manual_seed(SEED + tensor_index)
    frames = expert_frames(mixtral_expert(gen))
    received = [bytes(frames[0])] + [bytearray(f) for f in frames[1:]]
    payload = received[1 + tensor_index]
    pos = random.Random(tensor_index).randrange(len(payload))
    payload[pos] ^= 0x10
    reply = p.decode_reply(received)  # structurally fine: only the checksum can tell
    assert isinstance(reply, p.ExpertReply)
    with pytest.raises(ChecksumError, match=r"L3\.E5"):
        pl.verify(reply)


def test_swapped_tensor_frames_of_equal_size_are_detected_by_verify() -> None:
    gen = torch.Generator().manual_seed(SEED)
    frames = expert_frames(mixtral_expert(gen))
    swapped = [frames[0], frames[2], frames[1], frames[3]]
    reply = p.decode_reply(swapped)
    assert isinstance(reply, p.ExpertReply)
    with pytest.raises(ChecksumError):
        pl.verify(reply)


# --- malformed messages -------------------------------------------------------------------------------


def valid_expert() -> tuple[dict[str, Any], list[bytes]]:
    gen = torch.Generator().manual_seed(SEED)
    frames = expert_frames(
        {"w1": make_tensor(torch.bfloat16, (4, 2), gen), "b": make_tensor(torch.float32, (3,), gen)}
    )
    return header(frames), [bytes(f) for f in frames[1:]]


def with_fields(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    head = dict(base)
    for name, value in changes.items():
        if value is DROP:
            head.pop(name, None)
        else:
            head[name] = value
    return head


def with_tensor(base: dict[str, Any], index: int, **changes: Any) -> dict[str, Any]:
    tensors = [dict(t) for t in base["tensors"]]
    tensors[index] = with_fields(tensors[index], **changes)
    return with_fields(base, tensors=tensors)


DROP = object()
GET = {"v": p.PROTOCOL_VERSION, "op": "get", "id": 7, "keys": [[0, 1], [2, 3]]}
PING = {"v": p.PROTOCOL_VERSION, "op": "ping", "id": 7}
EXPERT_HEAD, EXPERT_PAYLOAD = valid_expert()

# Header-level violations: (id, frames, expected code). Each is checked against both decoders where the op
# allows, so a request decoder and a reply decoder agree on what is malformed.
MALFORMED_REQUESTS: list[tuple[str, list[Any], ErrorCode]] = [
    ("not-msgpack", [b"\xc1\x00\x01"], ErrorCode.BAD_MESSAGE),
    ("random-bytes", [bytes(random.Random(1).randrange(256) for _ in range(64))], ErrorCode.BAD_MESSAGE),
    ("empty-header-frame", [b""], ErrorCode.BAD_MESSAGE),
    ("truncated-msgpack", [msgpack.packb(GET)[:-3]], ErrorCode.BAD_MESSAGE),
    ("trailing-bytes", [msgpack.packb(PING) + b"\x00"], ErrorCode.BAD_MESSAGE),
    ("header-is-a-list", packed([1, "ping", 7]), ErrorCode.BAD_MESSAGE),
    ("header-is-an-int", packed(7), ErrorCode.BAD_MESSAGE),
    ("header-is-a-string", packed("ping"), ErrorCode.BAD_MESSAGE),
    ("invalid-utf8", [b"\x81\xa2op\xa2\xff\xfe"], ErrorCode.BAD_MESSAGE),
    ("ext-type", packed({**PING, "x": msgpack.ExtType(5, b"abc")}), ErrorCode.BAD_MESSAGE),
    ("int-map-key", [msgpack.packb({1: 2})], ErrorCode.BAD_MESSAGE),
    ("huge-declared-array", [b"\xdd\xff\xff\xff\xff"], ErrorCode.BAD_MESSAGE),
    ("huge-declared-map", [b"\xdf\xff\xff\xff\xff"], ErrorCode.BAD_MESSAGE),
    ("huge-declared-str", [b"\xdb\xff\xff\xff\xff"], ErrorCode.BAD_MESSAGE),
    ("huge-declared-bin", [b"\xc6\xff\xff\xff\xff"], ErrorCode.BAD_MESSAGE),
    ("deep-nesting", [b"\x91" * 5000 + b"\x00"], ErrorCode.BAD_MESSAGE),
    ("missing-v", packed(with_fields(PING, v=DROP)), ErrorCode.BAD_MESSAGE),
    ("missing-op", packed(with_fields(PING, op=DROP)), ErrorCode.BAD_MESSAGE),
    ("missing-id", packed(with_fields(PING, id=DROP)), ErrorCode.BAD_MESSAGE),
    ("v-is-a-string", packed(with_fields(PING, v="1")), ErrorCode.BAD_MESSAGE),
    ("v-is-true", packed(with_fields(PING, v=True)), ErrorCode.BAD_MESSAGE),
    ("v-is-next", packed(with_fields(PING, v=p.PROTOCOL_VERSION + 1)), ErrorCode.BAD_VERSION),
    ("v-is-0", packed(with_fields(PING, v=0)), ErrorCode.BAD_VERSION),
    (
        "next-v-with-unknown-op",
        packed(with_fields(PING, v=p.PROTOCOL_VERSION + 1, op="sync")),
        ErrorCode.BAD_VERSION,
    ),
    ("op-is-an-int", packed(with_fields(PING, op=3)), ErrorCode.BAD_MESSAGE),
    ("op-unknown", packed(with_fields(PING, op="frobnicate")), ErrorCode.UNKNOWN_OP),
    ("op-is-a-reply", packed(with_fields(PING, op="pong")), ErrorCode.UNKNOWN_OP),
    ("id-negative", packed(with_fields(PING, id=-1)), ErrorCode.BAD_MESSAGE),
    ("id-float", packed(with_fields(PING, id=7.0)), ErrorCode.BAD_MESSAGE),
    ("id-bool", packed(with_fields(PING, id=True)), ErrorCode.BAD_MESSAGE),
    ("id-string", packed(with_fields(PING, id="7")), ErrorCode.BAD_MESSAGE),
    ("id-nil", packed(with_fields(PING, id=None)), ErrorCode.BAD_MESSAGE),
    ("unknown-field", packed(with_fields(PING, extra=1)), ErrorCode.BAD_MESSAGE),
    ("ping-with-keys", packed(with_fields(PING, keys=[[0, 1]])), ErrorCode.BAD_MESSAGE),
    ("request-with-payload", [*packed(PING), b"\x00" * 4], ErrorCode.BAD_MESSAGE),
    ("header-too-large", packed(with_fields(PING, pad="x" * (64 * 1024))), ErrorCode.TOO_LARGE),
    ("too-many-frames", [*packed(PING), *([b""] * 65)], ErrorCode.TOO_LARGE),
    ("get-without-keys", packed(with_fields(GET, keys=DROP)), ErrorCode.BAD_MESSAGE),
    ("get-keys-not-a-list", packed(with_fields(GET, keys={"0": 1})), ErrorCode.BAD_MESSAGE),
    ("get-empty-keys", packed(with_fields(GET, keys=[])), ErrorCode.BAD_MESSAGE),
    ("get-key-not-a-pair", packed(with_fields(GET, keys=[[0, 1, 2]])), ErrorCode.BAD_MESSAGE),
    ("get-key-scalar", packed(with_fields(GET, keys=[5])), ErrorCode.BAD_MESSAGE),
    ("get-key-string", packed(with_fields(GET, keys=[["0", 1]])), ErrorCode.BAD_MESSAGE),
    ("get-key-negative", packed(with_fields(GET, keys=[[0, -1]])), ErrorCode.BAD_MESSAGE),
    ("get-key-float", packed(with_fields(GET, keys=[[0, 1.0]])), ErrorCode.BAD_MESSAGE),
    ("get-key-absurd", packed(with_fields(GET, keys=[[2**40, 1]])), ErrorCode.BAD_MESSAGE),
    ("get-duplicate-keys", packed(with_fields(GET, keys=[[0, 1], [0, 1]])), ErrorCode.BAD_MESSAGE),
    (
        "get-too-many-keys",
        packed(with_fields(GET, keys=[[0, i] for i in range(1025)])),
        ErrorCode.TOO_MANY_KEYS,
    ),
]


@pytest.mark.parametrize(
    ("frames", "code"), [c[1:] for c in MALFORMED_REQUESTS], ids=[c[0] for c in MALFORMED_REQUESTS]
)
def test_malformed_request_raises_protocol_error_with_its_code(frames: list[Any], code: ErrorCode) -> None:
    expect_code(code, p.decode_request, frames)


def E(**changes: Any) -> dict[str, Any]:
    return with_fields(EXPERT_HEAD, **changes)


def T(index: int, **changes: Any) -> dict[str, Any]:
    return with_tensor(EXPERT_HEAD, index, **changes)


W1, B = EXPERT_PAYLOAD
HELLO_REPLY = header(
    p.encode_hello_reply(
        1, "ab" * 16, p.ServerInfo("0.1.0", experts=8, layers=(0, 1), max_keys=64, max_in_flight=4)
    )
)
MALFORMED_REPLIES: list[tuple[str, list[Any], ErrorCode]] = [
    ("op-is-a-request", packed(with_fields(PING, op="get")), ErrorCode.UNKNOWN_OP),
    ("frames-not-a-list", b"\x83", ErrorCode.BAD_MESSAGE),  # type: ignore[list-item]
    ("no-frames", [], ErrorCode.BAD_MESSAGE),
    ("frame-not-a-buffer", [12345], ErrorCode.BAD_MESSAGE),
    ("expert-missing-frame", packed(E(), W1), ErrorCode.BAD_MESSAGE),
    ("expert-extra-frame", packed(E(), W1, B, b"\x00"), ErrorCode.BAD_MESSAGE),
    ("expert-frames-swapped-sizes", packed(E(), B, W1), ErrorCode.BAD_MESSAGE),
    ("expert-short-frame", packed(E(), W1[:-1], B), ErrorCode.BAD_MESSAGE),
    ("nbytes-not-frame-length", packed(T(1, nbytes=16, shape=[4]), W1, B), ErrorCode.BAD_MESSAGE),
    ("nbytes-not-dtype-times-shape", packed(T(0, nbytes=15), W1, B), ErrorCode.BAD_MESSAGE),
    ("shape-does-not-match-frame", packed(T(0, shape=[4, 3]), W1, B), ErrorCode.BAD_MESSAGE),
    ("dtype-changes-size", packed(T(0, dtype="F32"), W1, B), ErrorCode.BAD_MESSAGE),
    ("dtype-unknown", packed(T(0, dtype="F128"), W1, B), ErrorCode.BAD_MESSAGE),
    ("dtype-not-a-string", packed(T(0, dtype=2), W1, B), ErrorCode.BAD_MESSAGE),
    ("shape-negative", packed(T(0, shape=[-4, -2]), W1, B), ErrorCode.BAD_MESSAGE),
    ("shape-absurd", packed(T(0, shape=[2**62, 0]), W1, B), ErrorCode.BAD_MESSAGE),
    ("shape-absurd-but-empty", packed(T(0, shape=[2**62, 0], nbytes=0), b"", B), ErrorCode.BAD_MESSAGE),
    ("shape-product-over-limit", packed(T(0, shape=[2**40, 2**40]), W1, B), ErrorCode.TOO_LARGE),
    ("shape-too-many-dims", packed(T(0, shape=[1] * 9 + [8]), W1, B), ErrorCode.BAD_MESSAGE),
    ("shape-not-a-list", packed(T(0, shape=8), W1, B), ErrorCode.BAD_MESSAGE),
    ("shape-float-dim", packed(T(0, shape=[4.0, 2]), W1, B), ErrorCode.BAD_MESSAGE),
    ("nbytes-negative", packed(T(0, nbytes=-16), W1, B), ErrorCode.BAD_MESSAGE),
    ("nbytes-string", packed(T(0, nbytes="16"), W1, B), ErrorCode.BAD_MESSAGE),
    ("nbytes-over-limit", packed(T(0, nbytes=2**32, shape=[2**31]), W1, B), ErrorCode.TOO_LARGE),
    ("tensor-missing-nbytes", packed(T(0, nbytes=DROP), W1, B), ErrorCode.BAD_MESSAGE),
    ("tensor-extra-field", packed(T(0, offset=0), W1, B), ErrorCode.BAD_MESSAGE),
    ("tensor-empty-name", packed(T(0, name=""), W1, B), ErrorCode.BAD_MESSAGE),
    ("tensor-long-name", packed(T(0, name="n" * 300), W1, B), ErrorCode.BAD_MESSAGE),
    ("tensor-entry-not-a-map", packed(E(tensors=[1, 2]), W1, B), ErrorCode.BAD_MESSAGE),
    ("tensor-names-repeat", packed(T(1, name="w1"), W1, B), ErrorCode.BAD_MESSAGE),
    ("tensors-empty", packed(E(tensors=[])), ErrorCode.BAD_MESSAGE),
    ("tensors-not-a-list", packed(E(tensors="w1")), ErrorCode.BAD_MESSAGE),
    (
        "tensors-more-than-frames-allow",
        packed(E(tensors=[EXPERT_HEAD["tensors"][1]] * 65)),
        ErrorCode.TOO_LARGE,
    ),
    ("expert-missing-checksum", packed(E(checksum=DROP), W1, B), ErrorCode.BAD_MESSAGE),
    ("checksum-negative", packed(E(checksum=-1), W1, B), ErrorCode.BAD_MESSAGE),
    ("checksum-string", packed(E(checksum="abc"), W1, B), ErrorCode.BAD_MESSAGE),
    ("expert-key-missing", packed(E(key=DROP), W1, B), ErrorCode.BAD_MESSAGE),
    ("expert-key-bad", packed(E(key=[1]), W1, B), ErrorCode.BAD_MESSAGE),
    ("expert-unknown-field", packed(E(extra=None), W1, B), ErrorCode.BAD_MESSAGE),
    (
        "done-with-payload",
        [*packed({"v": p.PROTOCOL_VERSION, "op": "done", "id": 1}), b"x"],
        ErrorCode.BAD_MESSAGE,
    ),
    ("fingerprint-uppercase", packed(with_fields(HELLO_REPLY, fingerprint="AB" * 16)), ErrorCode.BAD_MESSAGE),
    ("fingerprint-not-hex", packed(with_fields(HELLO_REPLY, fingerprint="xyz")), ErrorCode.BAD_MESSAGE),
    ("fingerprint-empty", packed(with_fields(HELLO_REPLY, fingerprint="")), ErrorCode.BAD_MESSAGE),
    ("fingerprint-too-long", packed(with_fields(HELLO_REPLY, fingerprint="a" * 129)), ErrorCode.BAD_MESSAGE),
    ("fingerprint-newline", packed(with_fields(HELLO_REPLY, fingerprint="ab\n")), ErrorCode.BAD_MESSAGE),
    ("server-info-missing", packed(with_fields(HELLO_REPLY, server=DROP)), ErrorCode.BAD_MESSAGE),
    (
        "server-info-field-missing",
        packed(with_fields(HELLO_REPLY, server=with_fields(HELLO_REPLY["server"], layers=DROP))),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "server-info-negative-experts",
        packed(with_fields(HELLO_REPLY, server=with_fields(HELLO_REPLY["server"], experts=-1))),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "server-info-layers-strings",
        packed(with_fields(HELLO_REPLY, server=with_fields(HELLO_REPLY["server"], layers=["0"]))),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "error-unknown-code",
        packed({**PING, "op": "error", "error": {"code": "OOPS", "message": "m"}}),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "error-code-int",
        packed({**PING, "op": "error", "error": {"code": 3, "message": "m"}}),
        ErrorCode.BAD_MESSAGE,
    ),
    ("error-not-a-map", packed({**PING, "op": "error", "error": "BUSY"}), ErrorCode.BAD_MESSAGE),
    (
        "error-message-missing",
        packed({**PING, "op": "error", "error": {"code": "BUSY"}}),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "error-message-too-long",
        packed({**PING, "op": "error", "error": {"code": "BUSY", "message": "m" * 1025}}),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "error-bad-key",
        packed({**PING, "op": "error", "error": {"code": "BUSY", "message": "m"}, "key": [1, -2]}),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "stat-counter-bool",
        packed({**PING, "op": "stat_reply", "counters": {"up": True}}),
        ErrorCode.BAD_MESSAGE,
    ),
    (
        "stat-counter-string",
        packed({**PING, "op": "stat_reply", "counters": {"up": "yes"}}),
        ErrorCode.BAD_MESSAGE,
    ),
    ("stat-counters-not-a-map", packed({**PING, "op": "stat_reply", "counters": [1]}), ErrorCode.BAD_MESSAGE),
    (
        "stat-counter-bytes-name",
        packed({**PING, "op": "stat_reply", "counters": {b"up": 1}}),
        ErrorCode.BAD_MESSAGE,
    ),
]


@pytest.mark.parametrize(
    ("frames", "code"), [c[1:] for c in MALFORMED_REPLIES], ids=[c[0] for c in MALFORMED_REPLIES]
)
def test_malformed_reply_raises_protocol_error_with_its_code(frames: list[Any], code: ErrorCode) -> None:
    expect_code(code, p.decode_reply, frames)


def test_header_level_violations_are_reported_alike_by_the_reply_decoder() -> None:
    for name, frames, code in MALFORMED_REQUESTS:
        if name.startswith("get-") or name in {"op-is-a-reply", "op-unknown", "request-with-payload"}:
            continue  # op-specific to requests
        if name in {"ping-with-keys", "unknown-field"}:
            frames = packed(with_fields(msgpack.unpackb(frames[0]), op="pong"))
        expect_code(code, p.decode_reply, frames)


def test_the_valid_base_messages_of_the_malformed_tables_decode() -> None:
    # Guards the tables above: each case fails for its own mutation, not because its base was broken.
    assert p.decode_request(packed(GET)).keys == (ExpertKey(0, 1), ExpertKey(2, 3))
    assert p.decode_request(packed(PING)).op is Op.PING
    pl.verify(p.decode_reply(packed(EXPERT_HEAD, W1, B)))  # type: ignore[arg-type]
    assert isinstance(p.decode_reply(packed(HELLO_REPLY)), p.HelloReply)


def test_request_id_is_carried_by_the_error_when_it_was_readable() -> None:
    exc = expect_code(ErrorCode.BAD_VERSION, p.decode_request, packed(with_fields(PING, v=9, id=42)))
    assert exc.request_id == 42
    exc = expect_code(
        ErrorCode.TOO_MANY_KEYS,
        p.decode_request,
        packed(with_fields(GET, keys=[[0, i] for i in range(2000)])),
    )
    assert exc.request_id == 7
    exc = expect_code(ErrorCode.BAD_MESSAGE, p.decode_request, packed(with_fields(PING, id="x")))
    assert exc.request_id is None
    exc = expect_code(ErrorCode.BAD_MESSAGE, p.decode_request, [b"\xc1"])
    assert exc.request_id is None


def test_custom_limits_bound_frames_keys_and_header_size() -> None:
    small = Limits(max_header_bytes=512, max_keys=4, max_frames=3, max_frame_bytes=16)
    expect_code(ErrorCode.TOO_MANY_KEYS, p.decode_request, p.encode_get(1, [(0, i) for i in range(5)]), small)
    assert len(p.decode_request(p.encode_get(1, [(0, i) for i in range(4)]), small).keys) == 4
    big = bytes(20)
    frames = p.encode_expert_reply(1, (0, 0), [("w", "U8", (20,), big)], pl.checksum((0, 0), [big]))
    expect_code(ErrorCode.TOO_LARGE, p.decode_reply, frames, small)
    three = p.encode_expert_reply(1, (0, 0), [(f"t{i}", "U8", (1,), b"x") for i in range(3)], 0)
    expect_code(ErrorCode.TOO_LARGE, p.decode_reply, three, small)
    expect_code(ErrorCode.TOO_LARGE, p.decode_request, packed(with_fields(PING, pad="x" * 600)), small)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_keys": 0},
        {"max_frames": 1},
        {"max_header_bytes": 100},
        {"max_frame_bytes": -1},
        {"max_ndim": 2.5},
    ],
    ids=str,
)
def test_invalid_limits_are_a_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Limits(**kwargs)


# --- encoders refuse what decoders would refuse ----------------------------------------------------------


def test_encoders_refuse_invalid_input_with_protocol_errors() -> None:
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_ping, -1)
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_hello, 2**64)
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_get, True, [(0, 0)])
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_get, 1, [])
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_get, 1, [(0, 0), (0, 0)])
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_get, 1, [(0, -1)])
    expect_code(ErrorCode.TOO_MANY_KEYS, p.encode_get, 1, [(0, i) for i in range(1025)])
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_expert_reply, 1, (0, 0), [], 0)
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_expert_reply, 1, (0, 0), [("w", "F32", (3,), bytes(8))], 0)
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_expert_reply, 1, (0, 0), [("w", "F99", (2,), bytes(8))], 0)
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_expert_reply, 1, (0, 0), [("w", "U8", (1,), b"x")], -5)
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_expert_reply, 1, (0, 0), [("w", "U8", (1,), 17)], 0)
    dup = [("w", "U8", (1,), b"x"), ("w", "U8", (1,), b"y")]
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_expert_reply, 1, (0, 0), dup, 0)
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_hello_reply, 1, "NOT-HEX", p.ServerInfo("v", 1, (0,), 1, 1))
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_stat_reply, 1, {"x": "1"})
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_stat_reply, 1, {"x": 2**70})
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_error, 1, "BUSY", "m")
    expect_code(ErrorCode.BAD_MESSAGE, p.encode_error, 1, ErrorCode.BUSY, "m", key=(1,))
    long_names = [("n" * 250 + str(i), "U8", (1,), b"x") for i in range(60)]
    expect_code(
        ErrorCode.TOO_LARGE, p.encode_expert_reply, 1, (0, 0), long_names, 0, Limits(max_header_bytes=4096)
    )


# --- fuzzing ----------------------------------------------------------------------------------------------

WEIRD_VALUES: list[object] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 - 1, -(2**63), 1.5, float("nan"), "", "x" * 300,
    "get", "expert", "BF16", b"\x00\xff", [], [[]], [[0, 1]], [[-1, 2]], [0, 1], {}, {"a": 1}, [1] * 20,
    [{"name": "w", "dtype": "U8", "shape": [2], "nbytes": 2}],
]  # fmt: skip


def fuzz_corpus() -> list[list[bytes]]:
    gen = torch.Generator().manual_seed(SEED)
    info = p.ServerInfo("0.1.0", experts=16, layers=(0, 1), max_keys=1024, max_in_flight=8)
    messages = [
        p.encode_hello(1),
        p.encode_hello_reply(2, "0f" * 16, info),
        p.encode_get(3, [(0, 1), (1, 7), (5, 2)]),
        expert_frames(mixtral_expert(gen)),
        expert_frames({"s": torch.tensor(1.0), "e": torch.zeros(0, 4, dtype=torch.bfloat16)}),
        p.encode_done(4),
        p.encode_stat(5),
        p.encode_stat_reply(6, {"hits": 3, "rate": 0.5}),
        p.encode_ping(7),
        p.encode_pong(8),
        p.encode_error(9, ErrorCode.UNKNOWN_EXPERT, "no", key=(1, 2)),
    ]
    return [[bytes(f) for f in m] for m in messages]


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    frames = list(frames)
    kind = rng.randrange(9)
    head = bytearray(frames[0])
    if kind == 0 and head:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            head[rng.randrange(len(head))] ^= 1 << rng.randrange(8)
        frames[0] = bytes(head)
    elif kind == 1:  # truncate the header
        frames[0] = bytes(head[: rng.randrange(len(head) + 1)])
    elif kind == 2:  # trailing or inserted garbage
        pos = rng.randrange(len(head) + 1)
        frames[0] = bytes(head[:pos]) + rng.randbytes(rng.randint(1, 16)) + bytes(head[pos:])
    elif kind == 3:  # random header
        frames[0] = rng.randbytes(rng.randint(0, 96))
    elif kind == 4 and len(frames) > 1:  # drop a frame
        del frames[rng.randrange(len(frames))]
    elif kind == 5:  # add or duplicate a frame
        frames.insert(rng.randint(1, len(frames)), rng.choice([*frames, rng.randbytes(rng.randint(0, 32))]))
    elif kind == 6 and len(frames) > 1:  # truncate or extend a payload
        i = rng.randrange(1, len(frames))
        frames[i] = (
            frames[i][: rng.randrange(len(frames[i]) + 1)] if rng.random() < 0.5 else frames[i] + b"\x00"
        )
    else:  # structure-aware: replace, drop or add a field of the header (or of a nested map)
        try:
            obj = msgpack.unpackb(frames[0])
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return mutate(frames, rng)  # an earlier mutation broke the header: mutate bytes instead
        maps = [obj, *(v for v in obj.values() if isinstance(v, dict))]
        maps += (
            [t for t in obj.get("tensors", []) if isinstance(t, dict)]
            if isinstance(obj.get("tensors"), list)
            else []
        )
        target = rng.choice(maps)
        name = rng.choice([*target, "extra"])
        if rng.random() < 0.2:
            target.pop(name, None)
        else:
            target[name] = rng.choice(WEIRD_VALUES)
        frames[0] = msgpack.packb(obj)
    return frames


@pytest.mark.timeout(60)
def test_fuzzed_messages_raise_only_protocol_errors() -> None:
    rng = random.Random(SEED)
    corpus = fuzz_corpus()
    outcomes: dict[str, int] = {}
    for _ in range(4000):
        frames = mutate(rng.choice(corpus), rng)
        if rng.random() < 0.3:
            frames = mutate(frames, rng)
        for decode in (p.decode_request, p.decode_reply):
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                assert isinstance(exc, MessageError) and isinstance(exc.code, ErrorCode)
                outcomes[exc.code.value] = outcomes.get(exc.code.value, 0) + 1
                continue
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
            if isinstance(msg, p.ExpertReply):
                # Whatever the decoder accepts is safe to use: tensors build, checksums compare.
                tensors = pl.tensors_to_torch(msg)
                assert all(t.nbytes == w.nbytes for t, w in zip(tensors.values(), msg.tensors))
                try:
                    pl.verify(msg)
                except ChecksumError:
                    outcomes["checksum"] = outcomes.get("checksum", 0) + 1
    # The fuzzer reached both sides of the decoders and several distinct rejections.
    assert outcomes.get("accepted", 0) > 100
    assert outcomes.get("BAD_MESSAGE", 0) > 1000
    assert {"UNKNOWN_OP", "BAD_VERSION"} <= set(outcomes)


@pytest.mark.timeout(60)
def test_random_frames_raise_only_protocol_errors() -> None:
    rng = random.Random(SEED + 1)
    for _ in range(2000):
        frames = [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))]
        for decode in (p.decode_request, p.decode_reply):
            with pytest.raises(ProtocolError):
                decode(frames)


# --- real ZeroMQ sockets ---------------------------------------------------------------------------------


@pytest.fixture
def router_dealer() -> Any:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)  # a lost message fails the test instead of hanging it
        s.setsockopt(zmq.SNDTIMEO, 10_000)
    router.setsockopt(zmq.MAXMSGSIZE, p.DEFAULT_LIMITS.max_header_bytes)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield router, dealer
    finally:
        router.close()
        dealer.close()
        ctx.term()


def test_get_over_real_zmq_sockets_delivers_intact_tensors(router_dealer: Any) -> None:
    router, dealer = router_dealer
    gen = torch.Generator().manual_seed(SEED)
    served = {
        ExpertKey(1, 0): mixtral_expert(gen),
        ExpertKey(1, 3): {"w": make_tensor(torch.bfloat16, (512, 1024), gen), "s": torch.tensor(0.5)},
        ExpertKey(2, 0): {
            "empty": torch.zeros(0, 8, dtype=torch.float16),
            "i": make_tensor(torch.int8, (5,), gen),
        },
    }
    fingerprint = "c0ffee" * 5 + "00"

    # hello
    dealer.send_multipart(p.encode_hello(1), copy=False)
    ident, *frames = router.recv_multipart(copy=False)
    assert p.decode_request(frames) == p.Request(Op.HELLO, 1)
    info = p.ServerInfo("0.1.0", len(served), (1, 2), max_keys=1024, max_in_flight=8)
    router.send_multipart([ident, *p.encode_hello_reply(1, fingerprint, info)], copy=False)
    assert p.decode_reply(dealer.recv_multipart(copy=False)) == p.HelloReply(1, fingerprint, info)

    # get: two known experts, one unknown; each answered on its own, then done
    wanted = [(1, 3), (9, 9), (1, 0), (2, 0)]
    dealer.send_multipart(p.encode_get(2, wanted), copy=False)
    ident, *frames = router.recv_multipart(copy=False)
    request = p.decode_request(frames)
    for key in request.keys:
        if key not in served:
            router.send_multipart(
                [ident, *p.encode_error(request.id, ErrorCode.UNKNOWN_EXPERT, "no such", key)]
            )
            continue
        entries = [pl.tensor_entry(n, t) for n, t in served[key].items()]
        out = p.encode_expert_reply(request.id, key, entries, pl.checksum(key, (e[3] for e in entries)))
        assert len(out) == 1 + len(entries)
        router.send_multipart([ident, *out], copy=False)
    router.send_multipart([ident, *p.encode_done(request.id)], copy=False)

    received: dict[ExpertKey, dict[str, torch.Tensor]] = {}
    errors = []
    while True:
        reply = p.decode_reply(dealer.recv_multipart(copy=False))
        assert reply.id == 2
        if isinstance(reply, p.DoneReply):
            break
        if isinstance(reply, p.ErrorReply):
            errors.append(reply)
            continue
        assert isinstance(reply, p.ExpertReply)
        assert all(isinstance(t.data.obj, zmq.Frame) for t in reply.tensors)  # views over received frames
        pl.verify(reply)
        received[reply.key] = pl.tensors_to_torch(reply)
    assert [(e.code, e.key) for e in errors] == [(ErrorCode.UNKNOWN_EXPERT, ExpertKey(9, 9))]
    assert set(received) == set(served)
    for key, tensors in served.items():
        assert list(received[key]) == list(tensors)
        for name, t in tensors.items():
            assert same_bits(received[key][name], t), (key, name)


def test_malformed_request_over_real_sockets_gets_an_error_reply(router_dealer: Any) -> None:
    router, dealer = router_dealer
    for raw, code, rid in [
        ([b"\xc1garbage"], ErrorCode.BAD_MESSAGE, p.UNKNOWN_REQUEST_ID),
        (packed(with_fields(PING, v=3, id=11)), ErrorCode.BAD_VERSION, 11),
        (packed(with_fields(GET, id=12, keys=[[0, i] for i in range(1500)])), ErrorCode.TOO_MANY_KEYS, 12),
    ]:
        dealer.send_multipart(raw)
        ident, *frames = router.recv_multipart(copy=False)
        with pytest.raises(ProtocolError) as info:
            p.decode_request(frames)
        exc = info.value
        assert isinstance(exc, MessageError)
        reply_id = p.UNKNOWN_REQUEST_ID if exc.request_id is None else exc.request_id
        router.send_multipart([ident, *p.encode_error(reply_id, exc.code, str(exc))])
        reply = p.decode_reply(dealer.recv_multipart())
        assert isinstance(reply, p.ErrorReply)
        assert (reply.id, reply.code) == (rid, code)

    # A request larger than MAXMSGSIZE (set from the limits) is dropped by libzmq, never buffered or decoded;
    # the router keeps serving other peers.
    dealer.send_multipart([b"\x00" * (p.DEFAULT_LIMITS.max_header_bytes + 1)])
    other = dealer.context.socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    try:
        other.connect(dealer.getsockopt_string(zmq.LAST_ENDPOINT))
        other.send_multipart(p.encode_ping(13))
        ident, *frames = router.recv_multipart(copy=False)
        assert p.decode_request(frames) == p.Request(Op.PING, 13)
        assert router.poll(200) == 0
    finally:
        other.close()
