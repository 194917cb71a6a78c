"""Envelope encryption with AES-256-GCM.

A random data key per project encrypts that project's secret values; the
master key only wraps data keys. Associated data binds every ciphertext to
its place (project, scope, name, version), so a ciphertext copied into
another row fails to decrypt instead of yielding the wrong secret.
"""
from __future__ import annotations

import base64
import os
import pathlib
import secrets as _secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from berth.errors import FailedPrecondition, InvalidArgument

NONCE_BYTES = 12  # 96-bit nonces, fresh for every encryption
KEY_BYTES = 32  # AES-256


class DecryptionFailed(FailedPrecondition):
    """Stored ciphertext does not authenticate: tampered, moved, or a wrong key."""


def load_master_key(*, env_value: str, key_file: pathlib.Path | None) -> bytes:
    """The master key from BERTH_MASTER_KEY (base64) or a key file, created
    with 0600 permissions on first use."""
    if env_value:
        try:
            key = base64.b64decode(env_value, validate=True)
        except ValueError as exc:
            raise InvalidArgument("BERTH_MASTER_KEY is not valid base64") from exc
        if len(key) != KEY_BYTES:
            raise InvalidArgument(f"BERTH_MASTER_KEY must decode to {KEY_BYTES} bytes, not {len(key)}")
        return key
    if key_file is None:
        raise InvalidArgument("no master key: set BERTH_MASTER_KEY or give --master-key-file")
    if key_file.exists():
        key = base64.b64decode(key_file.read_text().strip())
        if len(key) != KEY_BYTES:
            raise InvalidArgument(f"master key file {key_file} does not hold a {KEY_BYTES}-byte key")
        return key
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = _secrets.token_bytes(KEY_BYTES)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode())
    return key


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    nonce = _secrets.token_bytes(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptionFailed(
            f"{what} failed to decrypt: the stored ciphertext was altered, moved to another row, "
            "or the master key is wrong"
        ) from None


def _dek_aad(project_id: str) -> bytes:
    return f"berth-data-key|{project_id}".encode()


def secret_aad(project_id: str, environment_id: str, name: str, version: int) -> bytes:
    scope = f"environment:{environment_id}" if environment_id else "project"
    return f"berth-secret|{project_id}|{scope}|{name}|{version}".encode()


def new_data_key(master_key: bytes, project_id: str) -> tuple[bytes, bytes, bytes]:
    """Returns (data key, nonce, wrapped data key)."""
    data_key = _secrets.token_bytes(KEY_BYTES)
    nonce, wrapped = _seal(master_key, data_key, _dek_aad(project_id))
    return data_key, nonce, wrapped


def unwrap_data_key(master_key: bytes, project_id: str, nonce: bytes, wrapped: bytes) -> bytes:
    return _open(master_key, nonce, wrapped, _dek_aad(project_id), f"the data key of project {project_id}")


def encrypt_value(data_key: bytes, value: str, aad: bytes) -> tuple[bytes, bytes]:
    return _seal(data_key, value.encode(), aad)


def decrypt_value(data_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes, what: str) -> str:
    return _open(data_key, nonce, ciphertext, aad, what).decode()
