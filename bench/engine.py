"""Engine overhead: issuances and steps per second through the real worker and store, with the
in-memory fake ports and a :class:`autotls.fsm.clock.ManualClock`, and memory per order.

The network is taken out (``tests/fakes/ports.py``: FakeCA issues real X.509 certificates from
its own key, FakeBroker publishes into FakeDns, FakeInstaller checks SAN and key), the clock
jumps to the next due time instead of sleeping (``autotls.fsm.worker.run_until_idle``), and the
store
is real (SQLite in a temporary directory by default, ``--db postgresql`` for a throw-away
PostgreSQL database). What is left is the engine's own cost per step: claim, snapshot, step
logic, policy, commit, journal -- plus the fakes' cryptography (key generation, CSR, signing).

Figures, per worker concurrency: issuances/s (New to Installed), steps/s, steps per issuance,
wall ms per step and the store's share of it. Then memory, measured in a separate run under
``tracemalloc`` (which slows everything down, so it is kept out of the timings): peak and
retained bytes per order for two sizes, their slope (the marginal cost of one more order),
and how much of what is retained belongs to the fakes (which keep every order, authorization
and certificate they ever made) rather than to the engine.

Multi-process (``--processes 1,4``, meant for ``--db postgresql``): N operating-system
processes, each a worker (concurrency: the first ``--concurrency``) with fake ports of its own,
on one shared database. Each process creates ``--orders`` orders of its own peers and works
only on them (``Worker(peers=...)``: a fake CA cannot answer for another process's orders,
and each process has its own fake CA, i.e. its own ACME account row), so the processes share
the tables, indexes, claims and commits, not the orders. They start together (a barrier);
the figure is all issuances over the time from the first start to the last finish, and the
ratio to one process is printed beside issue 11's target (4 processes >= 3x one).

``python -m bench.engine [--orders 200] [--concurrency 1,4] [--memory-orders 100,300]
[--db sqlite|postgresql] [--processes 1,4] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import multiprocessing
import os
import random
import time
import tracemalloc
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.machine import State
from autotls.fsm.ports import EngineSettings, Ports
from autotls.fsm.worker import OrderEvent, Worker, run_until_idle
from autotls.peerid import PrivateKey
from autotls.persistence.records import CommitPlan, OrderSnapshot
from autotls.persistence.store import ClaimedOrder, Store
from bench._common import (
    Report,
    add_json_flag,
    emit,
    pg_unavailable_reason,
    temporary_database,
)
from tests.fakes.ports import FakeBroker, FakeCA, FakeDns, FakeInstaller


class TimedStore(Store):
    """The real store, adding up the time spent in the calls the worker makes per step."""

    seconds = 0.0

    async def claim_due(
        self,
        owner: str,
        *,
        now: datetime,
        lease_seconds: float,
        limit: int,
        peers: Collection[str] | None = None,
    ) -> list[ClaimedOrder]:
        t0 = time.perf_counter()
        try:
            return await super().claim_due(
                owner, now=now, lease_seconds=lease_seconds, limit=limit, peers=peers
            )
        finally:
            self.seconds += time.perf_counter() - t0

    async def commit(
        self, snapshot: OrderSnapshot, plan: CommitPlan, *, now: datetime, worker: str
    ) -> bool:
        t0 = time.perf_counter()
        try:
            return await super().commit(snapshot, plan, now=now, worker=worker)
        finally:
            self.seconds += time.perf_counter() - t0

    async def next_due_at(self, *, peers: Collection[str] | None = None) -> datetime | None:
        t0 = time.perf_counter()
        try:
            return await super().next_due_at(peers=peers)
        finally:
            self.seconds += time.perf_counter() - t0


@dataclass
class Outcome:
    orders: int
    elapsed_s: float
    steps: int
    store_s: float
    peak_bytes: int = 0
    retained_bytes: int = 0
    retained_by_fakes: int = 0


def fake_ports(clock: ManualClock, ca_name: str | None = None) -> Ports:
    """The in-memory fake ports on ``clock``; ``ca_name``: a fake CA (and so an account row)
    of its own, for one process among several on a database."""
    dns = FakeDns()
    ca = FakeCA(clock)
    if ca_name is not None:
        ca.directory_url = f"https://{ca_name}.test/directory"
    return Ports(
        acme=ca,
        broker=FakeBroker(dns),
        dns=dns,
        installer=FakeInstaller(),
        clock=clock,
        settings=EngineSettings(),
        rng=random.Random(1),
    )


async def _with_orders(
    url: str, orders: int, *, upgrade: bool = True
) -> tuple[TimedStore, list[str]]:
    """The store at ``url`` holding ``orders`` new orders (of new peers), due now."""
    store = await TimedStore.open(url, upgrade=upgrade)
    assert isinstance(store, TimedStore)
    peers = [PrivateKey.generate().peer_id.to_base36() for _ in range(orders)]
    for peer in peers:
        await operator.create_order(store, peer, f"*.{peer}.libp2p.direct", now=ManualClock().now())
    return store, peers


async def _issue_all(
    db: str, orders: int, concurrency: int, *, trace_memory: bool = False
) -> Outcome:
    store, _ = await _with_orders(db, orders)
    try:
        clock = ManualClock()
        gc.collect()
        if trace_memory:
            tracemalloc.start()
        outcome = await _drive(store, clock, orders, concurrency)
        if trace_memory:
            # _drive has returned: the worker and the fakes it held are garbage now, so what is
            # still traced is the engine's (store, SQLAlchemy, driver); the fakes' share is
            # what their going away released.
            gc.collect()
            engine_bytes, outcome.peak_bytes = tracemalloc.get_traced_memory()
            outcome.retained_bytes = engine_bytes + outcome.retained_by_fakes
            tracemalloc.stop()
    finally:
        await store.close()
    return outcome


async def _drive(
    store: TimedStore,
    clock: ManualClock,
    orders: int,
    concurrency: int,
    *,
    peers: Collection[str] | None = None,
    ca_name: str | None = None,
) -> Outcome:
    ports = fake_ports(clock, ca_name)
    dns = ports.dns
    worker = Worker(
        store, ports, worker_id=ca_name or "bench", concurrency=concurrency, peers=peers
    )
    installed: set[int] = set()
    failed: list[str] = []

    def count(event: OrderEvent) -> None:
        if event.to_state == State.INSTALLED.value:
            installed.add(event.order_id)
        elif event.to_state == State.FAILED.value:
            failed.append(f"order {event.order_id}: {event.message}")

    async def settled() -> bool:
        return len(installed) == orders or bool(failed)

    worker.subscribe(count)
    started = time.perf_counter()
    await run_until_idle(
        worker, advance_clock=clock.set, stop_when=settled, max_rounds=100 * orders
    )
    elapsed = time.perf_counter() - started
    if failed or len(installed) != orders:
        raise RuntimeError(f"{len(installed)} of {orders} installed; failed: {failed[:3]}")
    outcome = Outcome(orders, elapsed, worker.steps_run, store.seconds)
    if tracemalloc.is_tracing():
        gc.collect()
        with_fakes = tracemalloc.get_traced_memory()[0]
        del worker, ports, dns
        gc.collect()
        outcome.retained_by_fakes = with_fakes - tracemalloc.get_traced_memory()[0]
    return outcome


def _child(index: int, url: str, orders: int, concurrency: int, barrier: Any, results: Any) -> None:
    """One process of the multi-process mode: its own orders, its own worker and fakes."""

    async def work() -> tuple[Any, ...]:
        store, peers = await _with_orders(url, orders, upgrade=False)
        try:
            clock = ManualClock()
            barrier.wait()
            database = url.rsplit("/", 1)[-1] if url.startswith("postgresql") else None
            started, cpu, busy = time.time(), time.process_time(), _machine_busy()
            db_cpu = _postgres_cpu(database) if database else 0.0
            out = await _drive(
                store, clock, orders, concurrency, peers=peers, ca_name=f"fake-ca-{index}"
            )
            cpu = time.process_time() - cpu
            ended = (time.time(), _machine_busy(), _postgres_cpu(database) if database else 0.0)
            barrier.wait()  # no backend exits (taking its CPU figures along) before all end
            return out.orders, started, ended[0], out.steps, cpu, busy, ended[1], db_cpu, ended[2]
        finally:
            await store.close()

    results.put(asyncio.run(work()))


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far (Linux ``/proc/stat``)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _postgres_cpu(database: str) -> float:
    """CPU seconds so far of the PostgreSQL backends serving ``database`` and of the server's
    WAL writer, from ``/proc`` (0 where that cannot be read, and on SQLite)."""
    total = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if not cmdline.startswith("postgres: "):
                continue
            if database not in cmdline and "walwriter" not in cmdline:
                continue
            fields = (proc / "stat").read_text().partition(") ")[2].split()
        except (OSError, UnicodeDecodeError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Fleet:
    rate: float  # issuances/s, all processes
    steps: int
    issued: int
    wall_s: float
    worker_cpu_s: float  # CPU of the worker processes, all of them
    machine_busy: float  # cores busy on the whole machine (workers, database, anything else)
    database_cpu_s: float  # CPU of the PostgreSQL server's processes (0 on SQLite)


def _processes(url: str, count: int, orders: int, concurrency: int) -> Fleet:
    """``count`` processes on the database ``url``, from the first start to the last end."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(i, url, orders, concurrency, barrier, results))
        for i in range(count)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=900) for _ in children]
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"a benchmark process exited with {child.exitcode}")
    issued = sum(o[0] for o in outcomes)
    first = min(outcomes, key=lambda o: o[1])
    last = max(outcomes, key=lambda o: o[2])
    wall = last[2] - first[1]
    busy = last[6][0] - first[5][0]
    total = last[6][1] - first[5][1]
    cores = os.cpu_count() or 1
    return Fleet(
        issued / wall,
        sum(o[3] for o in outcomes),
        issued,
        wall,
        sum(o[4] for o in outcomes),
        cores * busy / total if total else math.nan,
        last[8] - first[7],
    )


def run_processes(orders: int, counts: Sequence[int], concurrency: int, db: str) -> Report:
    report = Report(
        f"engine, worker processes on one {db} database (fake ports, ManualClock each)",
        [
            "processes",
            "conc",
            "orders",
            "issuances/s",
            "steps/s",
            "x one process",
            "target",
            "worker CPU ms/issuance",
            "database CPU ms/issuance",
            "cores busy",
        ],
        params={"orders per process": orders, "db": db},
    )
    single: float | None = None
    for count in counts:
        with temporary_database(db) as url:
            asyncio.run(_open_close(url))  # migrate once, before the processes start
            fleet = _processes(url, count, orders, concurrency)
        rate = fleet.rate
        if count == 1:
            single = rate
        ratio = rate / single if single else None
        report.add(
            processes=count,
            conc=concurrency,
            orders=orders * count,
            **{
                "issuances/s": rate,
                "steps/s": rate * fleet.steps / fleet.issued,
                "x one process": ratio,
                "target": ">= 3x (4 processes)" if count == 4 and db == "postgresql" else "-",
                "worker CPU ms/issuance": fleet.worker_cpu_s * 1000 / fleet.issued,
                "database CPU ms/issuance": fleet.database_cpu_s * 1000 / fleet.issued,
                "cores busy": fleet.machine_busy,
            },
        )
    report.notes.append(
        "issuances/s = all processes' issuances over first start to last finish; each process"
        " works on its own orders (peers=) with its own fake CA"
    )
    report.notes.append(
        f"cores busy: the whole machine's ({os.cpu_count()} cores) busy share over the run,"
        " database and other processes included; N processes cannot beat one by more than"
        " the cores left idle by one allow"
    )
    return report


async def _open_close(url: str) -> None:
    store = await Store.open(url)
    await store.close()


async def run(
    orders: int, concurrencies: Sequence[int], memory_orders: Sequence[int], db: str
) -> list[Report]:
    speed = Report(
        f"engine on fake ports ({db} store, ManualClock)",
        [
            "conc",
            "orders",
            "issuances/s",
            "steps/s",
            "steps/issuance",
            "ms/step",
            "store ms/step",
        ],
        params={"orders": orders, "db": db},
    )
    for concurrency in concurrencies:
        with temporary_database(db) as url:
            out = await _issue_all(url, orders, concurrency)
        speed.add(
            conc=concurrency,
            orders=orders,
            **{
                "issuances/s": out.orders / out.elapsed_s,
                "steps/s": out.steps / out.elapsed_s,
                "steps/issuance": out.steps / out.orders,
                "ms/step": out.elapsed_s * 1000 / out.steps,
                "store ms/step": out.store_s * 1000 / out.steps,
            },
        )
    speed.notes.append(
        "store ms/step adds up the claim, commit and next-due calls; with concurrency > 1 they"
        " overlap, so it can exceed the wall ms/step"
    )

    memory = Report(
        f"engine memory per order (tracemalloc, concurrency 4, {db} store)",
        ["orders", "peak KiB", "peak B/order", "retained B/order", "fakes' B/order"],
        params={"memory_orders": list(memory_orders)},
    )
    measured: list[Outcome] = []
    for size in memory_orders:
        with temporary_database(db) as url:
            out = await _issue_all(url, size, 4, trace_memory=True)
        measured.append(out)
        memory.add(
            orders=size,
            **{
                "peak KiB": out.peak_bytes / 1024,
                "peak B/order": out.peak_bytes / size,
                "retained B/order": out.retained_bytes / size,
                "fakes' B/order": out.retained_by_fakes / size,
            },
        )
    if len(measured) >= 2:
        small, large = measured[0], measured[-1]
        extra = large.orders - small.orders
        if extra > 0:
            memory.add(
                orders=f"slope {small.orders}->{large.orders}",
                **{
                    "peak B/order": (large.peak_bytes - small.peak_bytes) / extra,
                    "retained B/order": (large.retained_bytes - small.retained_bytes) / extra,
                    "fakes' B/order": (large.retained_by_fakes - small.retained_by_fakes) / extra,
                },
            )
    memory.notes.append(
        "retained = still allocated after the run (after gc), the store still open; fakes' ="
        " what dropping the fake ports released (the fake CA keeps every order and"
        " certificate); the rest is the engine's, SQLAlchemy's and the driver's"
    )
    return [speed, memory]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--concurrency", default="1,4", help="comma-separated")
    parser.add_argument("--memory-orders", default="100,300", help="comma-separated sizes")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--processes",
        default="",
        help="comma-separated process counts (e.g. 1,4): the multi-process mode only",
    )
    add_json_flag(parser)
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    memory_orders = [int(n) for n in args.memory_orders.split(",") if n.strip()]
    if args.orders < 1 or any(c < 1 for c in concurrencies) or any(n < 1 for n in memory_orders):
        parser.error("--orders, --concurrency and --memory-orders must be positive")
    if args.db == "postgresql" and (reason := pg_unavailable_reason()):
        parser.error(reason)
    if args.processes:
        counts = [int(n) for n in args.processes.split(",") if n.strip()]
        if any(n < 1 for n in counts):
            parser.error("--processes must be positive")
        emit([run_processes(args.orders, counts, concurrencies[0], args.db)], args.json)
        return
    emit(asyncio.run(run(args.orders, concurrencies, memory_orders, args.db)), args.json)


if __name__ == "__main__":
    main()
