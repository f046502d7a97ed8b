"""One worker process of the PostgreSQL fleet test (``tests/test_fleet_postgres.py``).

::

    python -m tests.fleet_worker --db URL --directory URL --ca-file FILE --dns HOST:PORT \\
        --challtestsrv URL --roots FILE --data-dir DIR --log FILE --worker-id w1 \\
        --concurrency 8 --lease-s 10 [--stall-at Finalized] [--deadline-s 150]

A real :class:`autotls.fsm.worker.Worker` over real ports -- :class:`AcmeAdapter` to Pebble,
:class:`AuthoritativeTxtChecker` against challtestsrv's DNS, :class:`Installer` checking chains
against Pebble's issuer roots -- except the broker, which is :class:`FakeTxtPublishingBroker`.

What it leaves for the test to judge:

* ``--log``: one JSON line per step that reached its commit, ``{"order", "fence", "state",
  "to", "outcome"}`` with outcome ``committed`` | ``fence_refused`` | ``commit_error``, and
  a last ``{"summary": ...}`` line (steps run, lost leases, how it ended).
* stdout: control lines for the test, ``PAUSED {...}`` when the stall below holds a commit,
  ``SUMMARY {...}`` at the end.
* exit status 0 once every order in the database is Installed; 1 when one Failed, the
  deadline passed or the worker crashed.

The stall (``--stall-at STATE``): the first time this worker is about to commit a step it
ran in STATE, it holds that commit -- the step's effect is done and its lease is no longer
renewed, the classic stale writer -- announces ``PAUSED`` and waits for SIGUSR1. While it
holds, it claims nothing new, so the order can only be taken over by another process. The
test releases it once another worker has committed that order under a higher fence, which
makes "a stale worker's late commit is refused by the fence" deterministic instead of a
matter of timing luck. (A pause *inside* a step would not do: the worker renews the lease of
a running step, so a live process never loses it there.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any, TextIO

from sqlalchemy import func, select

from autotls.adapters import AcmeAdapter
from autotls.dnscheck import AuthoritativeTxtChecker, parse_nameserver
from autotls.fsm.clock import SystemClock
from autotls.fsm.errors import TransientError
from autotls.fsm.machine import State
from autotls.fsm.ports import BrokerHealthView, EngineSettings, Ports, ReachabilityView
from autotls.fsm.steps import txt_name
from autotls.fsm.worker import Worker
from autotls.install import Installer, load_trust_roots
from autotls.localstack.challtestsrv import ChallTestSrv, ChallTestSrvError
from autotls.persistence.records import CommitPlan, OrderSnapshot
from autotls.persistence.store import ClaimedOrder, Store, orders

log = logging.getLogger("fleet_worker")

# Pebble with PEBBLE_VA_ALWAYS_VALID answers at once; the production poll intervals (seconds)
# would only make the test wait.
FLEET_SETTINGS = EngineSettings(
    dns_poll_interval=timedelta(milliseconds=500),
    authz_poll_interval=timedelta(milliseconds=500),
    order_poll_interval=timedelta(milliseconds=500),
)
WATCH_INTERVAL_S = 0.25


class FakeTxtPublishingBroker:
    """A fake of the AutoTLS broker (``autotls.fsm.ports.BrokerPort``) for the fleet test.

    It stands in for the broker because 200 libp2p nodes and their dial-backs are not the
    subject of this test (the local broker, with PeerID auth and a real dial-back, has its
    own tests). What the engine needs from a broker it does for real, like the local broker:
    it publishes ``_acme-challenge.<peer>.<zone>`` through pebble-challtestsrv's management
    API, so the real DNS checker queries a real record. It authenticates no one, dials no one
    back and registers no addresses."""

    def __init__(
        self, challtestsrv_url: str, *, zone: str = "libp2p.direct", timeout: float = 5.0
    ) -> None:
        self.challtestsrv = ChallTestSrv(challtestsrv_url, timeout=timeout)
        self.zone = zone

    async def health(self) -> BrokerHealthView:
        return BrokerHealthView(healthy=True)

    async def reachability(self, peer_id: str) -> ReachabilityView:
        # No node behind it, and nobody dials back: nothing to hold the orders for.
        return ReachabilityView(("/ip4/203.0.113.7/tcp/4001",), "fleet test: not dialed")

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        try:
            await self.challtestsrv.replace_txt(txt_name(peer_id, self.zone), value)
        except ChallTestSrvError as exc:
            raise TransientError(str(exc)) from None
        return []

    async def close(self) -> None:
        await self.challtestsrv.close()


class CommitStall:
    """Holds the first commit of a step run in ``state`` until :meth:`release`."""

    def __init__(self, state: str, out: TextIO) -> None:
        self.state = state
        self.out = out
        self.fired = False
        self.released = asyncio.Event()

    @property
    def holding(self) -> bool:
        return self.fired and not self.released.is_set()

    def wants(self, snapshot: OrderSnapshot) -> bool:
        return not self.fired and snapshot.state == self.state

    async def hold(self, snapshot: OrderSnapshot) -> None:
        self.fired = True
        paused = {"order": snapshot.id, "fence": snapshot.fence, "state": snapshot.state}
        print("PAUSED " + json.dumps(paused), file=self.out, flush=True)
        await self.released.wait()

    def release(self) -> None:
        self.released.set()


class RecordingStore(Store):
    """The real store, recording every commit attempt (one per step executed) with its
    fence and outcome, and hosting the optional :class:`CommitStall`."""

    steps_log: TextIO
    stall: CommitStall | None = None

    def record(self, entry: dict[str, Any]) -> None:
        self.steps_log.write(json.dumps(entry) + "\n")
        self.steps_log.flush()

    async def claim_due(
        self,
        owner: str,
        *,
        now: datetime,
        lease_seconds: float,
        limit: int,
        peers: Collection[str] | None = None,
    ) -> list[ClaimedOrder]:
        if self.stall is not None and self.stall.holding:
            await self.stall.released.wait()
            now = datetime.now(now.tzinfo)  # the worker's "now" went stale while we waited
        return await super().claim_due(
            owner, now=now, lease_seconds=lease_seconds, limit=limit, peers=peers
        )

    async def commit(
        self, snapshot: OrderSnapshot, plan: CommitPlan, *, now: datetime, worker: str
    ) -> bool:
        if self.stall is not None and self.stall.wants(snapshot):
            await self.stall.hold(snapshot)
        entry = {
            "order": snapshot.id,
            "fence": snapshot.fence,
            "state": snapshot.state,
            "to": plan.to_state,
        }
        try:
            committed = await super().commit(snapshot, plan, now=now, worker=worker)
        except Exception as exc:
            self.record({**entry, "outcome": "commit_error", "error": repr(exc)[:300]})
            raise
        self.record({**entry, "outcome": "committed" if committed else "fence_refused"})
        return committed


async def state_counts(store: Store) -> dict[str, int]:
    query = select(orders.c.state, func.count()).group_by(orders.c.state)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {str(state): int(count) for state, count in rows}


async def watch(store: RecordingStore, run: asyncio.Task[None], deadline: float) -> tuple[int, str]:
    """Until every order is Installed (0), one Failed, the worker died or time ran out (1)."""
    while True:
        if run.done():
            return 1, f"worker stopped on its own: {run.exception()!r}"
        counts = await state_counts(store)
        if counts.get(State.FAILED.value):
            return 1, f"{counts[State.FAILED.value]} order(s) Failed: {counts}"
        total = sum(counts.values())
        held = store.stall is not None and store.stall.holding
        if total and counts.get(State.INSTALLED.value) == total and not held:
            return 0, f"all {total} orders Installed"
        if time.monotonic() > deadline:
            return 1, f"deadline passed with {counts}"
        await asyncio.sleep(WATCH_INTERVAL_S)


async def main(args: argparse.Namespace, steps_log: TextIO) -> int:
    deadline = time.monotonic() + args.deadline_s
    # The test migrated the database before starting the fleet; never race on upgrades here.
    store = await RecordingStore.open(args.db, upgrade=False)
    store.steps_log = steps_log
    if args.stall_at:
        store.stall = CommitStall(args.stall_at, sys.stdout)
    acme = AcmeAdapter(args.directory, ca_file=args.ca_file)
    broker = FakeTxtPublishingBroker(args.challtestsrv)
    ports = Ports(
        acme=acme,
        broker=broker,
        dns=AuthoritativeTxtChecker(nameservers=[parse_nameserver(args.dns)]),
        installer=Installer(args.data_dir, trust_roots=load_trust_roots(args.roots)),
        clock=SystemClock(),
        settings=FLEET_SETTINGS,
    )
    worker = Worker(
        store,
        ports,
        worker_id=args.worker_id,
        concurrency=args.concurrency,
        lease=timedelta(seconds=args.lease_s),
        idle_poll=timedelta(seconds=1),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if store.stall is not None:
        loop.add_signal_handler(signal.SIGUSR1, store.stall.release)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    started = time.monotonic()
    run = asyncio.create_task(worker.run(stop, grace=30.0))
    try:
        code, verdict = await watch(store, run, deadline)
    finally:
        stop.set()
        try:
            await run
        except Exception as exc:
            code, verdict = 1, f"worker crashed: {exc!r}"
        await acme.close()
        await broker.close()
        await store.close()
    summary = {
        "worker": args.worker_id,
        "exit": code,
        "verdict": verdict,
        "steps_run": worker.steps_run,
        "lost_leases": worker.lost_leases,
        "acme_requests": acme.request_count,
        "stalled": bool(store.stall and store.stall.fired),
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    store.record({"summary": summary})
    print("SUMMARY " + json.dumps(summary), flush=True)
    return code


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.fleet_worker", description=__doc__)
    p.add_argument("--db", required=True, help="PostgreSQL URL of the fleet's database")
    p.add_argument("--directory", required=True, help="Pebble's ACME directory URL")
    p.add_argument("--ca-file", required=True, help="CA file for Pebble's HTTPS certificate")
    p.add_argument("--dns", required=True, help="challtestsrv DNS server, HOST:PORT")
    p.add_argument("--challtestsrv", required=True, help="challtestsrv management URL")
    p.add_argument("--roots", required=True, help="Pebble's issuer roots (PEM bundle)")
    p.add_argument("--data-dir", required=True, help="where certificates are installed")
    p.add_argument("--log", required=True, help="the step log (JSON lines) to append to")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--lease-s", type=float, default=10.0)
    p.add_argument("--deadline-s", type=float, default=150.0)
    p.add_argument(
        "--stall-at",
        choices=[s.value for s in State if s is not State.FAILED],
        help="hold the first commit of a step run in this state until SIGUSR1",
    )
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.lease_s <= 0 or args.deadline_s <= 0:
        p.error("--concurrency, --lease-s and --deadline-s must be positive")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s {arguments.worker_id} %(levelname)s %(name)s: %(message)s",
    )
    # Opened here, not in the loop: the step log's small appends are the only file I/O.
    with open(arguments.log, "a", encoding="utf-8") as step_log_file:
        sys.exit(asyncio.run(main(arguments, step_log_file)))
