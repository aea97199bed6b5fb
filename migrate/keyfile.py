"""Key files: `zcmigrate keygen` writes one, `send` and `receive` read one.

A key file holds a shared secret (keygen: 32 random bytes, hex, one line), readable by the
processes that migrate and nobody else. It knows files and permissions; what is derived
from the secret is channel/aead.py's.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from zcmigrate import ZcmigrateError
from zcmigrate.channel.aead import MIN_KEY_MATERIAL, shared_key


class KeyFileError(ZcmigrateError):
    """A key file that cannot be used; the message says what to do."""

    exit_code = 2


def keygen(path: Path) -> None:
    """Write a new key to `path` (mode 0600), refusing to overwrite or follow a link."""
    data = secrets.token_bytes(32).hex().encode() + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists: a key is never overwritten (remove it first if "
                           "you mean to replace it, and give the new one to both ends)") \
            from None
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o600)  # whatever the umask said
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key(path: Path) -> bytes:
    """The 32-byte shared key of a key file (surrounding whitespace stripped)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise KeyFileError(f"cannot open the key file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the key file {path} is not a regular file")
        if st.st_mode & stat.S_IROTH:
            raise KeyFileError(f"the key file {path} is readable by every user: "
                               f"`chmod o-r {path}` (0600, or 0640 for a service's group)")
        material = os.read(fd, 64 * 1024).strip()
    finally:
        os.close(fd)
    if len(material) < MIN_KEY_MATERIAL:
        raise KeyFileError(f"the key file {path} holds {len(material)} bytes, fewer than "
                           f"{MIN_KEY_MATERIAL}: make one with `zcmigrate keygen FILE`")
    return shared_key(material)
