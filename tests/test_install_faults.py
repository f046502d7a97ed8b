"""The local disk refuses to take the certificate: EACCES, EROFS, ENOSPC under ``certs/``.

Each is a real refusal by the kernel where this machine allows it:

* EACCES: a directory the process may not write (``chmod 0500``). As root, whom permissions do
  not stop, the install runs with the effective uid of ``nobody`` (``seteuid``) instead.
* EROFS: a read-only tmpfs mounted on the certificate directory (needs root and ``mount``).
* ENOSPC: a full 8 KiB tmpfs mounted there (same).

Without root or ``mount`` (an unprivileged developer machine), EROFS and ENOSPC are simulated
at the OS-call boundary instead (``os.fsync`` raising the errno), and the test says so in its
id. Either way the order must stay in Finalized with its certificate URL and chain, with class
``local`` and a message naming the path, retried with backoff, and be installed without a new
order once the disk takes writes again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from autotls import _files
from autotls.fsm.errors import ErrorClass
from autotls.fsm.machine import State
from autotls.install import Installer
from tests.fixtures.engine import Engine

NOBODY = 65534


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="autotls-mount-probe-"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(probe)],
            capture_output=True,
        )
        if done.returncode != 0:
            return False
        subprocess.run(["umount", "-l", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


MOUNT = _can_mount()


@contextlib.contextmanager
def _mounted(path: Path, options: str) -> Iterator[None]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


class SeteuidInstaller(Installer):
    """The real installer, run with the effective uid of ``nobody`` (the test runs as root,
    whom file permissions do not stop). Its body has no await before the writes, so no other
    coroutine of the test runs under that uid."""

    async def install(self, *args: Any, **kwargs: Any) -> Any:
        os.seteuid(NOBODY)
        try:
            return await super().install(*args, **kwargs)
        finally:
            os.seteuid(0)


Breaker = Callable[[Path], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def _read_only_dir(directory: Path) -> Iterator[None]:
    directory.chmod(0o500)
    try:
        yield
    finally:
        directory.chmod(0o700)


@contextlib.contextmanager
def _simulated(code: int) -> Iterator[None]:
    def fail(_fd: int) -> None:
        raise OSError(code, os.strerror(code))

    with mock.patch.object(_files.os, "fsync", fail):
        yield


@contextlib.contextmanager
def _full_tmpfs(directory: Path) -> Iterator[None]:
    with _mounted(directory, "size=8k,mode=0700"):
        with contextlib.suppress(OSError), (directory / "filler").open("wb") as fh:
            while True:
                fh.write(b"x" * 1024)
                fh.flush()
                os.fsync(fh.fileno())
        yield
        (directory / "filler").unlink()


@contextlib.contextmanager
def _read_only_tmpfs(directory: Path) -> Iterator[None]:
    with _mounted(directory, "ro,mode=0700"):
        yield


CASES: dict[str, tuple[int, Breaker]] = {
    "EACCES": (errno.EACCES, _read_only_dir),
    "EROFS": (errno.EROFS, _read_only_tmpfs if MOUNT else lambda _d: _simulated(errno.EROFS)),
    "ENOSPC": (errno.ENOSPC, _full_tmpfs if MOUNT else lambda _d: _simulated(errno.ENOSPC)),
}


def _case_id(name: str) -> str:
    return name if name == "EACCES" or MOUNT else f"{name}-simulated"


@pytest.mark.parametrize("name", list(CASES), ids=[_case_id(n) for n in CASES])
async def test_a_write_error_while_installing_keeps_the_order_in_finalized(
    engine: Engine, name: str
) -> None:
    code, breaker = CASES[name]
    # A data directory nobody may traverse but not write (root-owned 0755), so the seteuid
    # installer meets EACCES at the certificate directory itself, not on the way there.
    base = Path(tempfile.mkdtemp(prefix="autotls-disk-"))
    os.chmod(base, 0o755)
    try:
        root_run = os.geteuid() == 0
        kind = SeteuidInstaller if (name == "EACCES" and root_run) else Installer
        installer = kind(base / "data", clock=engine.clock)
        engine.ports.installer = installer
        order = await engine.order()
        directory = installer.certificate_dir(order.peer_id)
        _files.make_private_dirs(directory)
        if kind is SeteuidInstaller:
            for path in (base / "data", base / "data" / "certs", directory):
                path.chmod(0o755)  # traversable by nobody, writable by root only
        await engine.drive_to(order.id, State.FINALIZED)
        worker = engine.worker()
        with breaker(directory) if kind is Installer else contextlib.nullcontext():
            await worker.run_once()  # the chain is downloaded and stored in the row
            await worker.run_once()  # the install meets the disk
            snap = await engine.store.get_order(order.id)
            assert (snap.state, snap.last_error_class) == (
                State.FINALIZED.value,
                ErrorClass.LOCAL.value,
            ), snap.last_error_message
            message = snap.last_error_message or ""
            assert str(directory / "privkey.pem") in message, message
            assert errno.errorcode[code] in message, message
            assert snap.data["certificate_url"] and snap.data["chain_pem"]
            assert snap.cert_key_pem is not None
            delay = snap.next_run_at - engine.clock.now()
            assert timedelta(seconds=1) <= delay <= timedelta(seconds=2)
            engine.clock.set(snap.next_run_at)
            await worker.run_once()  # still refused: backoff grows, the order stays
            snap = await engine.store.get_order(order.id)
            assert snap.state == State.FINALIZED.value and snap.attempts == 2
        if kind is SeteuidInstaller:
            engine.ports.installer = Installer(base / "data", clock=engine.clock)
            for path in (base / "data", base / "data" / "certs", directory):
                path.chmod(0o700)
        await engine.drive_to(order.id, State.INSTALLED)
        assert engine.ca.count("new_order") == 1, "the issued certificate was installed"
        assert engine.ca.count("download_certificate") == 1, "from the stored chain"
        assert (directory / "privkey.pem").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
