"""Four worker processes, 200 orders, one PostgreSQL database, real Pebble (design.md rules 4-6).

Every process is ``python -m tests.fleet_worker``: a real worker over the real ACME adapter,
DNS checker and installer, with Pebble validating everything (``PEBBLE_VA_ALWAYS_VALID``) and
a fake broker that publishes the TXT records in challtestsrv. One process (w1) holds the
commit of its first Finalized step until another process has taken that order over under a
higher fence and committed it; then it is released, and its late commit must be refused.

What must hold afterwards: every order Installed; no (order, fence) stepped twice across all
processes; exactly one certificate per order with distinct serials, and the files on disk are
that certificate; every journal a valid path through the machine; no commit ever failed (the
journal's unique (order, fence) index never fired); the stale commit refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from autotls.fsm import operator
from autotls.fsm.journal import is_valid_journal
from autotls.fsm.machine import State
from autotls.install import FULLCHAIN, PRIVKEY
from autotls.localstack.pebble import PebbleOptions, PebbleStack
from autotls.peerid import PrivateKey
from autotls.persistence.store import CorruptOrder, Store
from tests.fixtures.pebble import PebbleFactory

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.pebble]

ORDERS = 200
WORKERS = 4
CONCURRENCY = 8
STALLED = "w1"
STALL_STATE = State.FINALIZED.value
STALLED_LEASE_S = 2.0  # short, so the held order is free for the others soon
LEASE_S = 10.0
WORKER_DEADLINE_S = 150.0
TAKEOVER_DEADLINE_S = 60.0
MAX_STARVED_STEPS = 5
REPO = Path(__file__).resolve().parent.parent


@dataclass
class FleetProcess:
    worker_id: str
    popen: subprocess.Popen[str]
    log: Path
    stderr: Path

    def steps(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [e for e in map(json.loads, lines) if "summary" not in e]

    def summary(self) -> dict[str, Any] | None:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        found = [e["summary"] for e in map(json.loads, lines) if "summary" in e]
        return found[-1] if found else None

    def stderr_tail(self, limit: int = 3000) -> str:
        return self.stderr.read_text()[-limit:] if self.stderr.exists() else ""


def _spawn(
    worker_id: str, stack: PebbleStack, db: str, roots: Path, data_dir: Path, tmp: Path
) -> FleetProcess:
    host, port = stack.dns_address
    argv = [
        sys.executable,
        "-m",
        "tests.fleet_worker",
        "--db",
        db,
        "--directory",
        stack.directory_url,
        "--ca-file",
        str(stack.ca_file),
        "--dns",
        f"{host}:{port}",
        "--challtestsrv",
        stack.challtestsrv_url,
        "--roots",
        str(roots),
        "--data-dir",
        str(data_dir),
        "--log",
        str(tmp / f"{worker_id}.steps.jsonl"),
        "--worker-id",
        worker_id,
        "--concurrency",
        str(CONCURRENCY),
        "--lease-s",
        str(STALLED_LEASE_S if worker_id == STALLED else LEASE_S),
        "--deadline-s",
        str(WORKER_DEADLINE_S),
    ]
    if worker_id == STALLED:
        argv += ["--stall-at", STALL_STATE]
    stderr = tmp / f"{worker_id}.stderr"
    env = {k: v for k, v in os.environ.items() if k != "AUTOTLS_FAULTS"}
    with open(stderr, "w") as err:
        popen = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    return FleetProcess(worker_id, popen, tmp / f"{worker_id}.steps.jsonl", stderr)


def _control_line(proc: FleetProcess) -> str:
    """The stalled worker's next stdout line (blocking; EOF if it exits without one)."""
    assert proc.popen.stdout is not None
    return proc.popen.stdout.readline()


async def _wait_taken_over(store: Store, order_id: int, fence: int) -> int:
    """Until another claim of ``order_id`` (fence > ``fence``) has committed a step."""
    deadline = time.monotonic() + TAKEOVER_DEADLINE_S
    while True:
        snap = await store.get_order(order_id)
        if snap.fence > fence and snap.state != STALL_STATE:
            return snap.fence
        assert time.monotonic() < deadline, (
            f"order {order_id} was not taken over within {TAKEOVER_DEADLINE_S:.0f}s: "
            f"{snap.state} fence {snap.fence} lease {snap.lease_owner}"
        )
        await asyncio.sleep(0.1)


async def test_four_worker_processes_issue_200_certificates_and_fence_a_stale_commit(
    postgres_url: str, pebble_factory: PebbleFactory, tmp_path: Path
) -> None:
    stack = pebble_factory(PebbleOptions(va_always_valid=True))
    roots = tmp_path / "pebble-roots.pem"
    roots.write_text("".join(stack.issuer_roots_pem()))
    data_dir = tmp_path / "data"

    # Migrate once, here: four processes upgrading an empty database at once would race.
    store = await Store.open(postgres_url)
    try:
        now = datetime.now(UTC)
        peers = [PrivateKey.generate().peer_id.to_base36() for _ in range(ORDERS)]
        order_ids = {
            (
                await operator.create_order(store, peer, f"*.{peer}.libp2p.direct", now=now)
            ).id: peer
            for peer in peers
        }
        fleet = [
            _spawn(f"w{n}", stack, postgres_url, roots, data_dir, tmp_path)
            for n in range(1, WORKERS + 1)
        ]
        try:
            stalled = fleet[0]
            line = await asyncio.to_thread(_control_line, stalled)
            assert line.startswith("PAUSED "), (
                f"{STALLED} never held a {STALL_STATE} commit; it said {line!r}; "
                f"stderr:\n{stalled.stderr_tail()}"
            )
            paused = json.loads(line.removeprefix("PAUSED "))
            held_order, held_fence = int(paused["order"]), int(paused["fence"])
            assert paused["state"] == STALL_STATE
            takeover_fence = await _wait_taken_over(store, held_order, held_fence)
            stalled.popen.send_signal(signal.SIGUSR1)

            for proc in fleet:
                try:
                    code = await asyncio.to_thread(proc.popen.wait, WORKER_DEADLINE_S + 60)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{proc.worker_id} did not exit:\n{proc.stderr_tail()}")
                assert code == 0, (
                    f"{proc.worker_id} exited {code}: {proc.summary()}\n{proc.stderr_tail()}"
                )
        finally:
            for proc in fleet:
                if proc.popen.poll() is None:
                    proc.popen.kill()
                    proc.popen.wait()
                if proc.popen.stdout is not None:
                    proc.popen.stdout.close()

        await _check_outcome(store, fleet, order_ids, data_dir)
        _check_stale_commit_refused(fleet, held_order, held_fence, takeover_fence)
    finally:
        await store.close()


async def _check_outcome(
    store: Store, fleet: list[FleetProcess], order_ids: dict[int, str], data_dir: Path
) -> None:
    rows = await store.list_orders()
    assert not [r for r in rows if isinstance(r, CorruptOrder)]
    states = Counter(r.state for r in rows if not isinstance(r, CorruptOrder))
    assert states == {State.INSTALLED.value: ORDERS}, states

    steps = [(p.worker_id, e) for p in fleet for e in p.steps()]
    per_fence = Counter((e["order"], e["fence"]) for _, e in steps)
    twice = {key: n for key, n in per_fence.items() if n > 1}
    assert not twice, f"(order, fence) stepped more than once: {twice}"
    errors = [(w, e) for w, e in steps if e["outcome"] == "commit_error"]
    assert not errors, f"commits failed (the journal's unique (order, fence) fired?): {errors}"
    committed = Counter(w for w, e in steps if e["outcome"] == "committed")
    assert all(committed[p.worker_id] > 0 for p in fleet), f"a worker did nothing: {committed}"
    # Fences make double work harmless; leases make it rare: a live lease keeps every other
    # worker off an order. Besides the held commit, only a step starved past its lease (a
    # badly overloaded machine) may be refused.
    refused = [(w, e) for w, e in steps if e["outcome"] == "fence_refused"]
    assert len(refused) <= 1 + MAX_STARVED_STEPS, f"duplicate work on leased orders: {refused}"

    certificates = await store.certificates()
    assert len(certificates) == ORDERS
    assert {c.order_id for c in certificates} == set(order_ids)
    assert len({c.serial for c in certificates}) == ORDERS
    for cert in certificates:
        assert cert.peer_id == order_ids[cert.order_id]
        # Several processes installed into one data directory: the files are this certificate.
        directory = data_dir / "certs" / cert.peer_id
        assert (directory / FULLCHAIN).read_text() == cert.chain_pem
        assert (directory / PRIVKEY).read_bytes() == cert.key_pem

    for order_id in order_ids:
        journal = await store.journal(order_id)
        assert is_valid_journal(journal), [(j.from_state, j.to_state, j.trigger) for j in journal]
        assert journal[-1].to_state == State.INSTALLED.value
        fences = [j.fence for j in journal]
        assert fences == sorted(set(fences)), f"order {order_id} journal fences {fences}"


def _check_stale_commit_refused(
    fleet: list[FleetProcess], order_id: int, held_fence: int, takeover_fence: int
) -> None:
    stalled, others = fleet[0], fleet[1:]
    late = [e for e in stalled.steps() if (e["order"], e["fence"]) == (order_id, held_fence)]
    assert late == [
        {
            "order": order_id,
            "fence": held_fence,
            "state": STALL_STATE,
            # The first commit of a Finalized step stores the downloaded chain (it stays in
            # Finalized); the install is the next one.
            "to": STALL_STATE,
            "outcome": "fence_refused",
        }
    ]
    summary = stalled.summary()
    assert summary is not None and summary["stalled"] and summary["lost_leases"] >= 1, summary
    # The order was finished by another process, under a later fence.
    takeover = [
        (p.worker_id, e)
        for p in others
        for e in p.steps()
        if e["order"] == order_id
        and e["fence"] > held_fence
        and e["state"] == STALL_STATE
        and e["to"] == State.INSTALLED.value
        and e["outcome"] == "committed"
    ]
    assert len(takeover) == 1, takeover
    assert held_fence < takeover[0][1]["fence"] <= takeover_fence
