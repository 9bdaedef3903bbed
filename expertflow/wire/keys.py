"""CurveZMQ keys: generate key pairs and load them (the daemon's side of CURVE is services.curve).

Keys are ZeroMQ certificate files (``NAME.key`` holds the public key, ``NAME.key_secret`` both keys), the
format ``zmq.auth`` reads and writes. An allow-list is a directory of client public certificates.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

from expertflow.errors import ConfigError

_Z85_KEY_LEN = 40


def keygen(directory: str | Path, name: str = "server") -> tuple[Path, Path]:
    """Create ``DIR/NAME.key`` (public, shareable) and ``DIR/NAME.key_secret`` (mode 0600)."""
    if not zmq.has("curve"):
        raise ConfigError("this libzmq was built without CURVE support")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid key name {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def load_secret_key(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE secret key {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public_key(key: str | Path) -> bytes:
    """A public key from a certificate file, or a 40-character Z85 key given inline."""
    text = str(key)
    if len(text) == _Z85_KEY_LEN and not os.path.exists(text):
        return text.encode()
    try:
        public, _ = zmq.auth.load_certificate(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE public key {text}: {exc}") from None
    return public


def client_curve_options(server_key: str | None, client_secret: str | None) -> dict[int, bytes]:
    """Socket options that make a client socket speak CURVE to a server with ``server_key``."""
    if server_key is None and client_secret is None:
        return {}
    if server_key is None or client_secret is None:
        raise ConfigError("CURVE needs both the server's public key and the client's secret key")
    public, secret = load_secret_key(client_secret)
    return {
        zmq.CURVE_SERVERKEY: load_public_key(server_key),
        zmq.CURVE_PUBLICKEY: public,
        zmq.CURVE_SECRETKEY: secret,
    }
