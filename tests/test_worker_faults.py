"""The worker facing its own machine: a database that refuses writes, a predecessor that died
holding leases, configuration waits after a restart, and secrets in library debug logs."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from autotls.fsm import operator
from autotls.fsm.errors import MisconfiguredError
from autotls.fsm.machine import State
from autotls.fsm.worker import Worker, owner_state
from autotls.logs import SecretFilter
from autotls.persistence.errors import StoreUnavailableError
from autotls.persistence.store import Store
from tests.fixtures.engine import Engine


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def _lease(engine: Engine, order_id: int, owner: str, seconds: float = 60) -> None:
    async with engine.store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE orders SET lease_owner = :o, lease_until = :u WHERE id = :id"),
            {
                "o": owner,
                "u": (engine.clock.now() + timedelta(seconds=seconds)).replace(tzinfo=None),
                "id": order_id,
            },
        )


async def test_a_dead_predecessor_on_this_host_loses_its_leases_at_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    host = socket.gethostname()
    dead, alive, remote = await engine.order(), await engine.order(), await engine.order()
    dead_owner = f"{host}:{_dead_pid()}:0badc0de"
    alive_owner = f"{host}:{os.getppid()}:0000beef"
    await _lease(engine, dead.id, dead_owner)
    await _lease(engine, alive.id, alive_owner)
    await _lease(engine, remote.id, "elsewhere.example:4242:12345678")
    assert owner_state(dead_owner) == "dead"
    worker = engine.worker()
    with caplog.at_level(logging.WARNING, logger="autotls"):
        assert await worker.take_over_dead_leases() == [dead.id]
    lines = [r.getMessage() for r in caplog.records]
    assert f"order {dead.id}: took over the lease of {dead_owner}, whose process is gone" in lines
    until = (engine.clock.now() + timedelta(seconds=60)).isoformat(timespec="seconds")
    assert (
        f"order {alive.id} is leased to worker {alive_owner} (pid {os.getppid()} is running) "
        f"until {until}: waiting for it"
    ) in lines
    assert any(f"order {remote.id} is leased" in line and "on host" in line for line in lines)
    # Only the dead worker's order is claimable now; its fence is bumped by the claim.
    before = (await engine.store.get_order(dead.id)).fence
    assert await worker.run_once() == 1
    snap = await engine.store.get_order(dead.id)
    assert snap.fence == before + 1 and snap.lease_owner is None  # claimed, stepped, committed
    assert (await engine.store.get_order(alive.id)).lease_owner == alive_owner


async def test_a_read_only_database_stops_the_worker_after_bounded_retries(
    tmp_path: Path, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ro.db"
    async with await Store.open(f"sqlite:///{path}") as store:
        await operator.create_order(store, "peer", "*.peer.libp2p.direct", now=engine.clock.now())
    with _read_only(path):
        store = await Store.open(f"sqlite:///{path}")
        try:
            worker = Worker(store, engine.ports, worker_id="ro", store_retries=4)
            stop = asyncio.Event()
            with caplog.at_level(logging.DEBUG, logger="autotls"):
                running = asyncio.ensure_future(worker.run(stop))
                for _ in range(3):
                    # The worker backs off on the clock (or gives up): then move the clock on.
                    backing_off = asyncio.ensure_future(engine.clock.sleeping())
                    await asyncio.wait({backing_off, running}, return_when=asyncio.FIRST_COMPLETED)
                    backing_off.cancel()
                    engine.clock.advance(60)
                with pytest.raises(StoreUnavailableError) as info:
                    await asyncio.wait_for(running, 10)
        finally:
            await store.close()
    message = str(info.value)
    assert "\n" not in message and "readonly" in message and str(path) in message
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    refused = [r for r in warnings if "refused to hand out work" in r.getMessage()]
    assert len(refused) == 3, [r.getMessage() for r in warnings]
    assert all(r.exc_info is None for r in warnings), "no traceback below debug"
    assert "readonly" in refused[0].getMessage()


def _read_only(path: Path):  # type: ignore[no-untyped-def]
    """The database file made read-only for this process: ``chattr +i`` as root (whom modes
    do not stop), ``chmod 0444`` otherwise."""
    import contextlib

    @contextlib.contextmanager
    def cm() -> Iterator[None]:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None:
                pytest.fail("chattr is needed to make a file read-only for root")
            subprocess.run(["chattr", "+i", str(path)], check=True)
            try:
                yield
            finally:
                subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o444)
            try:
                yield
            finally:
                path.chmod(0o600)

    return cm()


async def test_configuration_waits_are_tried_again_when_a_worker_starts(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.FINALIZED)
    engine.installer.fail(MisconfiguredError("the chain does not build (--trust-roots)"))
    worker = engine.worker()
    await worker.run_once()  # chain stored
    await worker.run_once()  # held: the next try is a minute away
    snap = await engine.store.get_order(order.id)
    assert (snap.state, snap.last_error_class) == (State.FINALIZED.value, "configuration")
    assert snap.next_run_at == engine.clock.now() + timedelta(minutes=1)
    await engine.worker().prepare()  # a new process, maybe with the fix
    snap = await engine.store.get_order(order.id)
    assert snap.next_run_at == engine.clock.now()
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == 1


async def test_library_debug_logs_never_carry_key_material(tmp_path: Path, engine: Engine) -> None:
    """SQLAlchemy and aiosqlite echo statement parameters at debug: the account and
    certificate keys. hide_parameters covers SQLAlchemy; the filter the CLI installs on its
    handler covers every library logger."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(SecretFilter())
    names = ("sqlalchemy", "aiosqlite", "autotls")
    saved = {n: logging.getLogger(n).level for n in names}
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.DEBUG)
        logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)
        order = await engine.order()
        await engine.drive_to(order.id, State.INSTALLED)
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger("sqlalchemy.engine").setLevel(logging.NOTSET)
    text_seen = "\n".join(records)
    assert "aiosqlite" in text_seen or "INSERT" in text_seen, "the libraries did log"
    assert "PRIVATE KEY" not in text_seen
    assert "[redacted private key]" in text_seen or "hidden due to" in text_seen
