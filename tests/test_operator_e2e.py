"""Operators and a running node, end to end with real processes (issue 10 §3).

* ``autotls renew --force``, ``autotls revoke`` and ``autotls retry`` take effect in a running
  ``autotls run`` at once, on SQLite and on PostgreSQL. The node runs with ``--store-poll 1h``,
  so its worker sleeps for an hour when idle: only the store's change notification (NOTIFY,
  or SQLite's ``data_version``) can wake it within the test's deadline. The assertions are on
  the journal (the worker's move after the operator's), never on time; ``bench.operator``
  prints the latencies.
* The running node advertises its forge address in identify (``advertise=`` wiring).
* At the default verbosity py-libp2p's own lines (``Failed to open stream to peer`` when a
  peer that connected will not be identified, ``MultiselectClient handshake: read failed``
  when one drops the connection meanwhile) never reach the terminal; with ``-v`` the same
  peers do make them show, so the test can tell. (py-libp2p also logs some warnings on the
  root logger, past its own loggers; ``test_cli.py`` drives that code directly.)
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autotls.localstack.pebble import pebble_available
from autotls.localstack.stack import LocalStack
from autotls.peerid import PeerId, load_private_key
from autotls.persistence.errors import StoreError
from autotls.persistence.records import JournalRecord, OrderSnapshot
from autotls.persistence.store import Store
from tests.fixtures.components import component_missing
from tests.fixtures.libp2p import identify
from tests.test_cli_e2e import (
    LISTEN,
    PROCESS_DEADLINE_S,
    Streaming,
    _closed_port,
    autotls,
    stack_env,
    start_autotls,
    write_roots,
)

pytestmark = pytest.mark.slow

POLL_DEADLINE_S = 60.0  # far below the node's idle poll (1 h): only a notification fits


@pytest.fixture
async def stack(libp2p_installed: None, tmp_path: Path) -> AsyncIterator[LocalStack]:
    if not pebble_available():
        component_missing("pebble (the pebble and pebble-challtestsrv binaries)")
    async with LocalStack(tmp_path / "stack") as running:
        yield running


class Node:
    """One ``autotls run`` on the local stack, and what the test reads of its database."""

    def __init__(self, stack: LocalStack, data_dir: Path, database: str) -> None:
        self.stack = stack
        self.data_dir = data_dir
        self.database = database
        self.running: Streaming | None = None
        self.peer = ""  # base36, as orders name it
        self.peer_id: PeerId | None = None
        self.tcp = ""  # the node's plain TCP listen address

    def where(self) -> list[object]:
        return ["--data-dir", self.data_dir, "--db", self.database]

    async def start(self, *extra: object) -> None:
        pebble = self.stack.pebble
        argv = ["run", *self.where(), "--ca", pebble.directory_url, "--ca-bundle", pebble.ca_file]
        argv += ["--listen", *LISTEN, "--store-poll", "1h", *extra]
        self.running = Streaming(await start_autotls(*argv, env=stack_env(self.stack)))
        listening = await self.running.line("listening on")
        self.tcp = listening.split("listening on ")[1].split(", ")[0].strip()
        self.peer_id = load_private_key(self.data_dir / "identity.key").peer_id
        self.peer = self.peer_id.to_base36()

    async def stop(self) -> str:
        assert self.running is not None
        self.running.process.terminate()
        stopped = await self.running.finish()
        assert stopped.code == 0, stopped.err
        return stopped.err

    async def order(self) -> OrderSnapshot | None:
        """The node's order; None while the node is still creating its schema or order."""
        try:
            async with await Store.open(self.database, upgrade=False) as store:
                mine = [
                    o
                    for o in await store.list_orders()
                    if isinstance(o, OrderSnapshot) and o.peer_id == self.peer
                ]
        except StoreError:
            return None
        assert len(mine) <= 1
        return mine[0] if mine else None

    async def journal(self) -> list[JournalRecord]:
        snap = await self.order()
        if snap is None:
            return []
        async with await Store.open(self.database, upgrade=False) as store:
            return await store.journal(snap.id)

    async def until(self, what: str, check: object) -> OrderSnapshot:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_DEADLINE_S
        while True:
            snap = await self.order()
            if snap is not None and check(snap):  # type: ignore[operator]
                return snap
            if loop.time() > deadline:
                log = "".join(self.running.lines) if self.running else ""
                now = snap.state if snap else "no order"
                pytest.fail(f"order never {what} (now {now}):\n{log[-4000:]}")
            await asyncio.sleep(0.1)

    async def moved_by_worker_after(self, trigger: str, occurrence: int) -> None:
        """Until the worker journals a move after the ``occurrence``-th ``trigger``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_DEADLINE_S
        while True:
            journal = await self.journal()
            marks = [i for i, e in enumerate(journal) if e.trigger == trigger]
            if len(marks) >= occurrence:
                mark = marks[occurrence - 1]
                assert (journal[mark].worker or "").startswith("cli:"), journal[mark]
                after = journal[mark + 1 :]
                if any((e.worker or "").count(":") == 2 for e in after):  # host:pid:random
                    return
            if loop.time() > deadline:
                pytest.fail(f"the running worker never took up {trigger} #{occurrence}")
            await asyncio.sleep(0.05)


def serial(snap: OrderSnapshot) -> str:
    assert snap.certificate is not None
    return snap.certificate.serial


async def operator(*argv: object) -> str:
    """An operator command as its own process; its stdout."""
    done = await autotls(*argv, env={})
    assert done.code == 0, done.err
    return done.out


@pytest.fixture(params=["sqlite", "postgresql"])
def database_for(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """A database URL for a node named ``name`` (SQLite: its own file; PostgreSQL: one
    throw-away database shared by every node of the test)."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path / name / 'autotls.db'}"
    url = str(request.getfixturevalue("postgres_url"))
    return lambda _name: url


async def test_operator_commands_reach_a_running_node_at_once(
    stack: LocalStack, tmp_path: Path, database_for: object
) -> None:
    roots = write_roots(stack, tmp_path / "roots.pem")
    node = Node(stack, tmp_path / "a", database_for("a"))  # type: ignore[operator]
    await node.start("--trust-roots", roots)
    try:
        first = serial(await node.until("installed", lambda s: s.state == "Installed"))
        assert node.peer_id is not None
        seen = await identify(node.tcp, node.peer_id)
        forge = f"/dns4/127-0-0-1.{node.peer}.libp2p.direct/tcp/"
        assert any(a.startswith(forge) and a.endswith("/tls/ws") for a in seen.listen_addrs)
        assert node.running is not None
        await node.running.line(f"identify advertises {forge}")  # and says so

        said = await operator("renew", "--force", *node.where())
        assert "takes it up at once" in said
        await node.moved_by_worker_after("force_renewal", 1)
        renewed = serial(
            await node.until("renewed", lambda s: s.state == "Installed" and serial(s) != first)
        )

        said = await operator("revoke", "--ca-bundle", stack.pebble.ca_file, *node.where())
        assert f"revoked certificate {renewed}" in said
        await node.moved_by_worker_after("force_renewal", 2)
        await node.until("replaced", lambda s: s.state == "Installed" and serial(s) != renewed)
        async with await Store.open(node.database, upgrade=False) as store:
            revoked = [c for c in await store.certificates() if c.serial == renewed]
        assert revoked and revoked[0].revoked_at is not None  # recorded with the renewal
    finally:
        err = await node.stop()
    assert "certificate renewed:" not in err  # results go to stdout

    # A node whose issued chain does not build to its trust roots (the system bundle, no
    # Pebble root) waits in Finalized for an operator; retry reaches it at once too.
    waiting = Node(stack, tmp_path / "b", database_for("b"))  # type: ignore[operator]
    await waiting.start()
    try:
        await waiting.until(
            "waiting for a fix",
            lambda s: s.state == "Finalized" and s.last_error_class == "configuration",
        )
        listed = json.loads(await operator("status", "--json", *waiting.where()))
        (row,) = [r for r in listed if r["peer_id"] == waiting.peer]
        assert row["operator_action"].startswith("needs an operator fix (--trust-roots)")
        said = await operator("retry", "--order", row["id"], *waiting.where())
        assert "installs the certificate the CA already issued (no new order)" in said
        await waiting.moved_by_worker_after("retry_install", 1)
    finally:
        await waiting.stop()


# -- py-libp2p's own log lines ----------------------------------------------------------------


def _connect_without_identify(
    address: str, peer: PeerId, connected: threading.Event, release: threading.Event
) -> None:
    """Connect to the node as a py-libp2p peer that does not speak identify, and stay until
    ``release``: the node identifies every new peer, is refused the protocol, and py-libp2p
    logs an ERROR about it ("Failed to open stream to peer"); closing then makes its swarm
    connection log more, some of it on the root logger."""
    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.custom_types import TProtocol
    from libp2p.identity.identify.identify import ID as IDENTIFY
    from libp2p.identity.identify_push.identify_push import ID_PUSH as IDENTIFY_PUSH
    from libp2p.peer.id import ID
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    pair = create_new_key_pair()

    async def main() -> None:
        host = new_host(
            key_pair=pair,
            sec_opt={
                TProtocol(NOISE_ID): NoiseTransport(pair, noise_privkey=new_x25519().private_key)
            },
            muxer_opt={TProtocol(YAMUX_ID): Yamux},
        )
        for protocol in (IDENTIFY, IDENTIFY_PUSH):
            host.remove_stream_handler(protocol)
        async with host.run([]):
            with trio.fail_after(10):
                await host.get_network().dial_addr(multiaddr.Multiaddr(address), ID(peer.multihash))
            connected.set()
            while not release.is_set():  # noqa: ASYNC110 - the release comes from asyncio
                await trio.sleep(0.01)
            await host.close()

    trio.run(main)


@pytest.mark.parametrize("verbosity", [[], ["-v"]], ids=["default", "verbose"])
async def test_libp2p_lines_stay_off_the_terminal_by_default(
    libp2p_installed: None, tmp_path: Path, verbosity: list[str]
) -> None:
    """The same peers at both verbosities; with ``-v`` their trouble does show (which is how
    the test knows the scenario makes py-libp2p talk), by default nothing of it does."""
    # No CA, no broker: the node runs (the order waits for a CA that is not there).
    dead = f"http://127.0.0.1:{_closed_port()}"
    process = await start_autotls(
        *verbosity, "run", "--data-dir", tmp_path / "node", "--listen", *LISTEN,
        "--ca", f"{dead}/dir", "--broker", dead, env={},
    )  # fmt: skip
    running = Streaming(process)
    listening = await running.line("listening on")
    tcp = listening.split("listening on ")[1].split(", ")[0].strip()
    peer = load_private_key(tmp_path / "node" / "identity.key").peer_id
    for _ in range(2):
        connected, release = threading.Event(), threading.Event()
        dialer = asyncio.ensure_future(
            asyncio.to_thread(_connect_without_identify, tcp, peer, connected, release)
        )
        try:
            await asyncio.wait_for(asyncio.to_thread(connected.wait), PROCESS_DEADLINE_S)
            # A full identify of the node from another peer meanwhile: round trips that the
            # node's own (failing) identify of the first peer does not wait for.
            seen = await identify(tcp, peer)
            assert seen.listen_addrs
            if verbosity:
                await running.line("Failed to open stream to peer")
        finally:
            release.set()
            await asyncio.wait_for(dialer, PROCESS_DEADLINE_S)
    process.terminate()
    stopped = await running.finish()
    assert stopped.code == 0, stopped.err
    if not verbosity:
        for trace in ("Failed to open stream", "Multiselect", "handshake", "muxed", "ERROR",
                      "Traceback", "resetting stream", "on_close"):  # fmt: skip
            assert trace not in stopped.err, stopped.err
