"""Envelope encryption with AES-256-GCM.

A random data key per project encrypts that project's secret values; the
master key only wraps data keys. Associated data binds every ciphertext to
its place (project, scope, name, version), so a ciphertext copied into
another row fails to decrypt instead of yielding the wrong secret.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import pathlib
import secrets as _secrets
import threading
from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from berth.errors import FailedPrecondition, InvalidArgument

NONCE_BYTES = 12  # 96-bit nonces, fresh for every encryption
KEY_BYTES = 32  # AES-256


class DecryptionFailed(FailedPrecondition):
    """Stored ciphertext does not authenticate: tampered, moved, or a wrong key."""


def fingerprint(key: bytes) -> str:
    """A short public id of a master key (a hash: never the key)."""
    return hashlib.sha256(b"berth-master-key-id|" + key).hexdigest()[:16]


def _read_key_file(path: pathlib.Path) -> bytes:
    try:
        key = base64.b64decode(path.read_text().strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise InvalidArgument(f"master key file {path} does not hold a base64 {KEY_BYTES}-byte key")
    return key


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key_file(path: pathlib.Path, key: bytes) -> None:
    """Atomically replaces ``path`` with ``key``: a 0600 temporary file,
    fsync, rename over the target, fsync of the directory. A crash leaves
    either the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{_secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(key).decode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class MasterKeyring:
    """The master keys this process holds, by fingerprint.

    ``current`` wraps new data keys. A key file may be accompanied by
    ``<file>.previous``: the key it replaced during a rotation that has not
    finished re-wrapping every data key yet. Each wrapped data key records
    the fingerprint of its wrapping key, so unwrapping picks the right one.
    A key given by value (BERTH_MASTER_KEY) cannot be rotated by the service:
    it does not own where the key lives.

    Several secrets services may share one key file (several instances of
    ``berth up``, or containers sharing a volume) and one database. They
    coordinate through an flock on the key file's directory: a rotation (and the
    recovery of an interrupted one) holds it exclusively from writing the new
    key until ``.previous`` is gone; every other write holds it shared while
    it reads the current key and commits, so no data key is ever wrapped by a
    key that a rotation elsewhere has already retired. A keyring re-reads the
    key file when it changed (``refresh``) and when it meets a data key
    wrapped by a key it does not hold: another instance rotated."""

    def __init__(self, current: bytes, *, key_file: pathlib.Path | None = None, previous: bytes | None = None) -> None:
        self._lock = threading.Lock()
        self._current = current
        self._keys = {fingerprint(current): current}
        self._retiring: bytes | None = previous  # the key a rotation replaces
        if previous is not None:
            self._keys.setdefault(fingerprint(previous), previous)
        self.key_file = key_file
        self._file_state = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        if self.key_file is None:
            return None
        try:
            st = self.key_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Takes the key file's key as current when the file changed since
        this keyring last read it (another instance rotated); the keys held
        before stay held. Returns whether anything changed."""
        if self.key_file is None:
            return False
        state = self._stat()
        if state is None or state == self._file_state:
            return False
        current = _read_key_file(self.key_file)
        previous_file = previous_path(self.key_file)
        previous = _read_key_file(previous_file) if previous_file.exists() else None
        with self._lock:
            self._file_state = state
            if previous is not None:
                self._keys.setdefault(fingerprint(previous), previous)
            self._keys.setdefault(fingerprint(current), current)
            changed = current != self._current
            if changed:
                self._retiring = self._current
                self._current = current
        return changed

    @contextlib.contextmanager
    def file_lock(self, *, exclusive: bool) -> Iterator[None]:
        """The flock every instance sharing the key file takes (see the
        class): exclusive to rotate, shared to wrap or re-read a data key."""
        if self.key_file is None:
            yield
            return
        # The key file's directory is the lock: no file of its own is left
        # behind, and every instance sharing the key file shares it.
        fd = os.open(self.key_file.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    @classmethod
    def load(cls, *, env_value: str, key_file: pathlib.Path | None) -> MasterKeyring:
        if env_value:
            return cls(load_master_key(env_value=env_value, key_file=None))
        current = load_master_key(env_value="", key_file=key_file)
        assert key_file is not None
        previous_file = previous_path(key_file)
        previous = _read_key_file(previous_file) if previous_file.exists() else None
        return cls(current, key_file=key_file, previous=previous)

    @property
    def rotatable(self) -> bool:
        return self.key_file is not None

    @property
    def current(self) -> bytes:
        return self._current

    @property
    def current_id(self) -> str:
        return fingerprint(self._current)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._keys)

    def candidates(self, key_id: str) -> list[bytes]:
        """Keys to try on a data key wrapped by ``key_id`` ("" = unknown);
        a key not held sends the keyring to the key file first."""
        if key_id and key_id not in self.ids():
            self.refresh()
        with self._lock:
            if key_id:
                key = self._keys.get(key_id)
                return [key] if key is not None else []
            return [self._current, *(k for k in self._keys.values() if k is not self._current)]

    def begin_rotation(self) -> bytes:
        """Step 1 of a rotation: the current key is saved as ``.previous``,
        a new key replaces the key file (each write atomic), and both are
        held. Data keys are still wrapped by the old one, which stays
        readable from ``.previous`` if the process dies now."""
        assert self.key_file is not None
        if previous_path(self.key_file).exists():
            raise FailedPrecondition(
                f"{previous_path(self.key_file)} exists: an earlier rotation has not finished",
                hint="re-wrap the data keys under the current key first",
            )
        new = _secrets.token_bytes(KEY_BYTES)
        write_key_file(previous_path(self.key_file), self._current)
        write_key_file(self.key_file, new)
        with self._lock:
            self._keys[fingerprint(new)] = new
            self._retiring = self._current
            self._current = new
            self._file_state = self._stat()
        return new

    def finish_rotation(self) -> None:
        """Last step, once every data key is wrapped by the current key in
        a committed transaction: ``.previous`` is deleted. Only the current
        key and the one before it stay in memory, for reads that began
        before the commit."""
        assert self.key_file is not None
        path = previous_path(self.key_file)
        if path.exists():
            path.unlink()
            _fsync_dir(path.parent)
        with self._lock:
            keep = {fingerprint(self._current): self._current}
            if self._retiring is not None:
                keep.setdefault(fingerprint(self._retiring), self._retiring)
            self._keys = keep


def previous_path(key_file: pathlib.Path) -> pathlib.Path:
    return key_file.with_name(key_file.name + ".previous")


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
        return _read_key_file(key_file)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = _secrets.token_bytes(KEY_BYTES)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode())
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(key_file.parent)
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
    nonce, wrapped = wrap_data_key(master_key, project_id, data_key)
    return data_key, nonce, wrapped


def wrap_data_key(master_key: bytes, project_id: str, data_key: bytes) -> tuple[bytes, bytes]:
    return _seal(master_key, data_key, _dek_aad(project_id))


def unwrap_data_key(master_key: bytes, project_id: str, nonce: bytes, wrapped: bytes) -> bytes:
    return _open(master_key, nonce, wrapped, _dek_aad(project_id), f"the data key of project {project_id}")


def unwrap_with(keyring: MasterKeyring, key_id: str, project_id: str, nonce: bytes, wrapped: bytes) -> bytes:
    """Unwraps with the master key that wrapped it (by fingerprint)."""
    candidates = keyring.candidates(key_id)
    if not candidates:
        raise DecryptionFailed(
            f"the data key of project {project_id} is wrapped by master key {key_id}, which this service "
            f"does not hold (it holds {', '.join(sorted(keyring.ids()))})",
            hint="restore the key file (or its .previous) that the data keys were wrapped with",
        )
    error: DecryptionFailed | None = None
    for key in candidates:
        try:
            return unwrap_data_key(key, project_id, nonce, wrapped)
        except DecryptionFailed as exc:
            error = exc
    assert error is not None
    raise error


def encrypt_value(data_key: bytes, value: str, aad: bytes) -> tuple[bytes, bytes]:
    return _seal(data_key, value.encode(), aad)


def decrypt_value(data_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes, what: str) -> str:
    return _open(data_key, nonce, ciphertext, aad, what).decode()
