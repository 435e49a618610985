"""Node keys: one Ed25519 key pair per node.

The private key lives in ``<state dir>/node.key`` as an unencrypted PKCS#8 PEM file (so
``openssl pkey -in node.key -noout -text`` can read it), mode 0600. The node id is the first 20
bytes of SHA-256 of the raw 32-byte public key: the size Kademlia ids must have.

The state directory is ``$HERDWALL_STATE_DIR`` if set, else ``/var/lib/herdwall`` for root and
``~/.local/state/herdwall`` for anyone else.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "node.key"
NODE_ID_LEN = 20
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
# A PEM Ed25519 PKCS#8 key is 119 bytes; anything much bigger is not ours.
_MAX_KEY_FILE = 4096


class KeyFileError(Exception):
    """The node key file is missing, unreadable, unsafe or corrupt. The message says what to do."""


def default_state_dir() -> Path:
    env = os.environ.get("HERDWALL_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/herdwall")
    return Path.home() / ".local" / "state" / "herdwall"


def node_id_of(public_raw: bytes) -> bytes:
    """Node id of a raw Ed25519 public key."""
    return hashlib.sha256(public_raw).digest()[:NODE_ID_LEN]


def verify_signature(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is ``public_raw``'s Ed25519 signature of ``data``; False for a
    wrong signature and for malformed keys or signatures (never raises for hostile input)."""
    if (type(public_raw) is not bytes or len(public_raw) != PUBLIC_KEY_LEN
            or type(signature) is not bytes or len(signature) != SIGNATURE_LEN):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class NodeKey:
    """A node's Ed25519 private key."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_bytes: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> NodeKey:
        """From a raw 32-byte Ed25519 seed (tests and fixed demo keys)."""
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @property
    def node_id(self) -> bytes:
        return node_id_of(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:
        # Never print key material.
        return f"NodeKey(node_id={self.node_id.hex()})"

    def _pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    def save(self, state_dir: Path | str | None = None, *, force: bool = False) -> Path:
        """Write the key to ``state_dir/node.key`` (mode 0600) and return its path.

        The file appears whole or not at all: a temporary file (created 0600, so the key is
        never readable by others, not even for a moment) is written, fsynced and then linked
        (refuses an existing key) or renamed (``force``) into place."""
        directory = Path(state_dir) if state_dir is not None else default_state_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / KEY_FILE
        if path.exists() and not force:
            raise KeyFileError(f"a node key already exists at {path}; "
                               "use --force to replace it (the node id will change)")
        tmp = directory / f".{KEY_FILE}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit
                os.write(fd, self._pem())
                os.fsync(fd)
            finally:
                os.close(fd)
            if force:
                os.replace(tmp, path)
            else:
                try:
                    # link() fails if the name exists: no window where another key is clobbered.
                    os.link(tmp, path)
                except FileExistsError:
                    raise KeyFileError(f"a node key already exists at {path}; "
                                       "use --force to replace it") from None
                os.unlink(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        return path

    @classmethod
    def load(cls, state_dir: Path | str | None = None) -> NodeKey:
        """Read ``state_dir/node.key``; refuses a file that group or others may read or write."""
        directory = Path(state_dir) if state_dir is not None else default_state_dir()
        path = directory / KEY_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise KeyFileError(f"no node key at {path}; create one with: herdwall keygen"
                               + ("" if state_dir is None else f" --state-dir {directory}")
                               ) from None
        except OSError as exc:
            raise KeyFileError(f"cannot open node key {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"node key {path} is not a regular file")
            if info.st_mode & 0o077:
                raise KeyFileError(
                    f"node key {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); fix it with: chmod 600 {path}")
            data = os.read(fd, _MAX_KEY_FILE + 1)
        finally:
            os.close(fd)
        if len(data) > _MAX_KEY_FILE:
            raise KeyFileError(f"node key {path} is too large to be a key file")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"node key {path} is corrupt or not a PEM private key "
                               f"({type(exc).__name__})") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError(f"node key {path} is not an Ed25519 key")
        return cls(private)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse fsync on a directory.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
