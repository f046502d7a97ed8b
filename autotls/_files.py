"""Files and directories holding secrets (design.md rule 11).

* Writes are atomic: a temp file created with its final mode (key files 0600 from the first
  byte), fsynced, renamed over the target, and the directory fsynced so the rename survives a
  power cut.
* Every directory autotls creates is 0700, whatever the umask: the certificate directory
  holds ``privkey.pem``, and a directory others may write lets them swap it.
* An existing directory that others may write (or that another user owns) is refused, as
  OpenSSH refuses such a ``~/.ssh``: :func:`directory_problem` says why, callers raise.
* Identity key files are read bounded: regular files only, at most :data:`MAX_KEY_FILE`
  bytes, opened without blocking (a FIFO, ``/dev/zero`` or ``/dev/urandom`` is one clear
  error at once, not gigabytes of memory or a hang).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
# An identity key is a few hundred bytes; the largest this library accepts, an 8192-bit RSA
# key in PKCS#8 PEM, is about 6.4 KiB. 16 KiB leaves room for comments and CRLF line ends
# and still refuses anything that is not a key long before it costs memory.
MAX_KEY_FILE = 16 * 1024


class KeyFileError(ValueError):
    """A key file that cannot be read as one (the message names the file and the reason)."""


def make_private_dirs(path: str | os.PathLike[str]) -> None:
    """Create ``path`` and its missing parents, each 0700 (the umask cannot widen it, and a
    chmod after mkdir undoes a umask that narrowed it oddly)."""
    target = Path(path)
    missing: list[Path] = []
    current = target
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # another process made it: checked by the caller like any existing one
        os.chmod(directory, PRIVATE_DIR_MODE)


def directory_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a safe home for keys, or None: not a directory, owned by another
    user (root excepted), or writable by group or others."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory"
    if info.st_uid not in (0, os.geteuid()):
        return f"{path} belongs to another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        mode = stat.S_IMODE(info.st_mode)
        return (
            f"{path} is writable by {'others' if info.st_mode & 0o002 else 'its group'} "
            f"(mode {mode:04o}): anyone who can write there can replace the keys in it; "
            f"run `chmod go-w {path}` (or chmod 700)"
        )
    return None


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = PUBLIC_MODE) -> None:
    target = Path(path)
    make_private_dirs(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Write key material: mode 0600, atomically."""
    write_atomic(path, data, mode=SECRET_MODE)


def read_key_file(path: str | os.PathLike[str], *, limit: int = MAX_KEY_FILE) -> bytes:
    """The bytes of a key file: a regular file of at most ``limit`` bytes. Raises
    :class:`KeyFileError` for anything else (OSError for a file that cannot be opened)."""
    _check_regular(os.stat(path).st_mode, path)  # names sockets, which cannot be opened
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)  # what was opened, whatever the path points to by now
        _check_regular(info.st_mode, path)
        if info.st_size > limit:
            raise KeyFileError(
                f"{path}: {info.st_size} bytes is too large for a key file (limit {limit})"
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            # Bounded even if the file grows while we read it.
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise KeyFileError(f"{path}: larger than {limit} bytes: not a key file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def exposed_to_others(path: str | os.PathLike[str]) -> bool:
    """True when group or others may read the file (a key file should be 0600)."""
    return bool(os.stat(path).st_mode & 0o044)


def _check_regular(mode: int, path: str | os.PathLike[str]) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"{path}: not a regular file ({_kind(mode)})")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
