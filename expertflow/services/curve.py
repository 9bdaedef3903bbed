"""The server side of CurveZMQ (RFC 26, as ZMTP 3 carries it, RFC 25), for the daemon's own ZMTP front end.

The handshake: the client's HELLO proves it knows the server's long-term key; WELCOME sends a short-term
server key and a cookie (the state the server needs later, sealed under a key of this process); INITIATE
returns the cookie with the client's long-term key and a vouch binding its short-term key to it; READY
confirms. Afterwards every frame travels as a ``MESSAGE`` data frame: an 8-byte nonce and a box holding one
flags byte (MORE, COMMAND) and the payload. Nonces of each direction strictly increase. libsodium does the
cryptography (PyNaCl); this module only lays the bytes out as the RFC and libzmq do, so that any libzmq client
with the server's public key talks to it unchanged.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import nacl.bindings as nb
import nacl.exceptions
import zmq.auth
from nacl._sodium import ffi, lib  # PyNaCl's libsodium binding: replies are sealed in place, without copies
from zmq.utils import z85

from expertflow.errors import ConfigError
from expertflow.wire.keys import load_secret_key

MORE, COMMAND = 0x01, 0x02
_MAC = 16
#: Bytes a MESSAGE adds around a frame: name (8), nonce (8), MAC (16), flags (1).
MESSAGE_OVERHEAD = 8 + 8 + _MAC + 1
_HELLO_SIZE = 200
_INITIATE_MIN = 257


class CurveError(Exception):
    """A peer's CURVE handshake or message does not verify (the connection is closed)."""


class CurveKeys:
    """The server's long-term key pair and the client keys allowed in (None: any client that completes the
    handshake, i.e. encryption without authentication), loaded from ZeroMQ certificate files."""

    def __init__(self, secret_file: str | Path, allow_dir: str | Path | None) -> None:
        public, secret = load_secret_key(secret_file)
        self.public = z85.decode(public)
        self.secret = z85.decode(secret)
        self.allowed: frozenset[bytes] | None = None
        if allow_dir is not None:
            if not Path(allow_dir).is_dir():
                raise ConfigError(f"--allow-keys {allow_dir} is not a directory of client public keys")
            keys = zmq.auth.load_certificates(str(allow_dir))
            self.allowed = frozenset(z85.decode(k) for k in keys)

    def allows(self, client_key: bytes) -> bool:
        return self.allowed is None or client_key in self.allowed


def _nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + struct.pack(">Q", counter)


class CurveSession:
    """One connection's CURVE state, server side."""

    def __init__(self, keys: CurveKeys) -> None:
        self.keys = keys
        self._short_public, self._short_secret = nb.crypto_box_keypair()
        self._cookie_key = os.urandom(nb.crypto_secretbox_KEYBYTES)
        self._client_short = b""
        self._precomputed = b""
        self._nonce = 1  # ours: READY takes 1, messages follow
        self._peer_nonce = 0
        self.client_key = b""

    def _peer(self, nonce: bytes) -> None:
        value = struct.unpack(">Q", nonce)[0]
        if value <= self._peer_nonce:
            raise CurveError("a nonce that does not increase (replayed or reordered frame)")
        self._peer_nonce = value

    def welcome(self, hello: bytes) -> bytes:
        """Check HELLO (the command's bytes, name included); the WELCOME command's bytes."""
        if len(hello) != _HELLO_SIZE or not hello.startswith(b"\x05HELLO"):
            raise CurveError("malformed HELLO")
        if hello[6:8] != b"\x01\x00":
            raise CurveError(f"CurveZMQ version {hello[6]}.{hello[7]} is not 1.0")
        self._client_short = hello[80:112]
        self._peer(hello[112:120])
        try:
            signature = nb.crypto_box_open(
                hello[120:200], b"CurveZMQHELLO---" + hello[112:120], self._client_short, self.keys.secret
            )
        except nacl.exceptions.CryptoError:
            raise CurveError("HELLO does not open: the client has another server key") from None
        if signature != bytes(64):
            raise CurveError("malformed HELLO signature")
        cookie_nonce = os.urandom(16)
        cookie = cookie_nonce + nb.crypto_secretbox(
            self._client_short + self._short_secret, b"COOKIE--" + cookie_nonce, self._cookie_key
        )
        welcome_nonce = os.urandom(16)
        box = nb.crypto_box(
            self._short_public + cookie, b"WELCOME-" + welcome_nonce, self._client_short, self.keys.secret
        )
        return b"\x07WELCOME" + welcome_nonce + box

    def initiate(self, initiate: bytes) -> bytes:
        """Check INITIATE; the client's metadata. ``client_key`` is its long-term key afterwards."""
        if len(initiate) < _INITIATE_MIN or not initiate.startswith(b"\x08INITIATE"):
            raise CurveError("malformed INITIATE")
        try:
            cookie = nb.crypto_secretbox_open(
                initiate[25:105], b"COOKIE--" + initiate[9:25], self._cookie_key
            )
        except nacl.exceptions.CryptoError:
            raise CurveError("INITIATE carries a cookie this server did not make") from None
        if cookie != self._client_short + self._short_secret:
            raise CurveError("INITIATE cookie belongs to another session")
        self._peer(initiate[105:113])
        try:
            plain = nb.crypto_box_open(
                initiate[113:],
                b"CurveZMQINITIATE" + initiate[105:113],
                self._client_short,
                self._short_secret,
            )
        except nacl.exceptions.CryptoError:
            raise CurveError("INITIATE does not open") from None
        client_key, vouch_nonce, vouch = plain[:32], plain[32:48], plain[48:128]
        try:
            vouched = nb.crypto_box_open(vouch, b"VOUCH---" + vouch_nonce, client_key, self._short_secret)
        except nacl.exceptions.CryptoError:
            raise CurveError("INITIATE vouch does not open") from None
        if vouched[:32] != self._client_short:
            raise CurveError("INITIATE vouch is for another short-term key")
        self._precomputed = nb.crypto_box_beforenm(self._client_short, self._short_secret)
        self.client_key = client_key
        return plain[128:]

    def ready(self, metadata: bytes) -> bytes:
        """The READY command's bytes, carrying our metadata."""
        counter = self._take_nonce()
        box = nb.crypto_box_afternm(metadata, _nonce(b"CurveZMQREADY---", counter), self._precomputed)
        return b"\x05READY" + struct.pack(">Q", counter) + box

    def _take_nonce(self) -> int:
        value = self._nonce
        self._nonce += 1
        return value

    def open_message(self, frame: bytes) -> tuple[int, bytes]:
        """A MESSAGE frame's (flags, payload)."""
        if len(frame) < MESSAGE_OVERHEAD or not frame.startswith(b"\x07MESSAGE"):
            raise CurveError("expected a MESSAGE")
        self._peer(frame[8:16])
        try:
            plain = nb.crypto_box_open_afternm(
                frame[16:], b"CurveZMQMESSAGEC" + frame[8:16], self._precomputed
            )
        except nacl.exceptions.CryptoError:
            raise CurveError("a MESSAGE does not open (tampered, or another session's)") from None
        return plain[0], plain[1:]

    def seal_frame(self, flags: int, payload: bytes | memoryview) -> bytearray:
        """``payload`` as a whole ZMTP data frame (frame header included) holding one MESSAGE.

        The payload is copied once, into the frame, and encrypted there in place (libsodium allows the box to
        overlap its plaintext): encryption cannot be zero-copy, but it need not copy more than once.
        """
        size = len(payload)
        body = MESSAGE_OVERHEAD + size
        head = struct.pack(">BQ", 0x02, body) if body > 255 else struct.pack(">BB", 0, body)
        frame = bytearray(len(head) + body)
        counter = self._take_nonce()
        box_at = len(head) + 16
        plain_at = box_at + _MAC
        frame[: len(head)] = head
        frame[len(head) : box_at] = b"\x07MESSAGE" + struct.pack(">Q", counter)
        frame[plain_at] = flags
        frame[plain_at + 1 :] = payload
        base = ffi.cast("unsigned char *", ffi.from_buffer(frame, require_writable=True))
        nonce = _nonce(b"CurveZMQMESSAGES", counter)
        if (
            lib.crypto_box_easy_afternm(base + box_at, base + plain_at, size + 1, nonce, self._precomputed)
            != 0
        ):
            raise CurveError("encryption failed")
        return frame
