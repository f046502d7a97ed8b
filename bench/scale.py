"""Scale: claim latency, worker memory and start-up with 1,000 and 100,000 orders stored.

For each backend and size N: a fresh database filled in bulk (one ``INSERT`` of many rows,
not N issuances) with N orders, all but ``--due`` of them Installed and due in 60 days (as
a node's or fleet's database mostly is), the rest New and due now. Then a separate worker
process, started fresh so that its memory is its own:

* start-up: from spawning the process to its worker being ready (imports, ``Store.open``
  with its schema check, :meth:`~autotls.fsm.worker.Worker.prepare` -- which looks at every
  active order once -- the first claim and next-due read); wall time and RSS then;
* claim latency: ``claim_due(limit=1)`` then ``release``, ``--claims`` times (the claim is
  what every step starts with), and ``next_due_at`` (what an idle worker asks before it
  sleeps); p50/p95 ms;
* memory: RSS after the claims and the peak that ``tracemalloc`` traced during them.

The figures should not depend on N: the claim and the next-due read walk the partial index
``ix_orders_due`` (active orders by due time) and stop at the first rows. The query plans of
both statements, as each backend's ``EXPLAIN`` prints them, are shown for the larger size.

``python -m bench.scale [--sizes 1000,100000] [--due 200] [--claims 300]
[--backends sqlite,postgresql] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._common import (
    Report,
    add_json_flag,
    emit,
    percentile,
    pg_unavailable_reason,
    temporary_database,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
BATCH = 5_000


def fill(url: str, size: int, due: int) -> float:
    """Migrate the database and insert ``size`` orders in bulk; returns the seconds taken."""
    from sqlalchemy import create_engine, insert

    from autotls.persistence import schema
    from autotls.persistence.models import orders
    from autotls.persistence.urls import parse_database_url, sync_url

    parsed = parse_database_url(url)
    schema.ensure_current(parsed, upgrade_allowed=True)
    engine = create_engine(sync_url(parsed))
    started = time.perf_counter()
    later = NOW + timedelta(days=60)
    with engine.begin() as conn:
        for start in range(0, size, BATCH):
            rows = []
            for i in range(start, min(size, start + BATCH)):
                waiting = i >= due
                rows.append(
                    {
                        "peer_id": f"k51bench{i:09d}",
                        "identifier": f"*.k51bench{i:09d}.libp2p.direct",
                        "state": "Installed" if waiting else "New",
                        "data": {"renew_at": later.isoformat()} if waiting else {},
                        "fence": 3 if waiting else 0,
                        "seq": 9 if waiting else 1,
                        "next_run_at": later if waiting else NOW - timedelta(seconds=1),
                        "attempts": 0,
                        "created_at": NOW,
                        "updated_at": NOW,
                    }
                )
            conn.execute(insert(orders), rows)
    engine.dispose()
    return time.perf_counter() - started


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50) * 1000, "p95": percentile(values, 95) * 1000}


async def child(url: str, claims: int) -> dict[str, Any]:
    """The worker process: ready, then the claims; prints one line of JSON."""
    from sqlalchemy import event

    from autotls.fsm.clock import ManualClock
    from autotls.fsm.worker import Worker
    from autotls.persistence.store import Store
    from bench.engine import fake_ports

    store = await Store.open(url, upgrade=False)
    worker = Worker(store, fake_ports(ManualClock(NOW)), worker_id="scale", concurrency=1)
    await worker.prepare()
    await store.claim_due("scale", now=NOW, lease_seconds=60, limit=1)
    await store.next_due_at()
    ready = {"rss_kib": _rss_kib()}
    print(json.dumps({"ready": ready}), flush=True)

    statements: list[tuple[str, Any]] = []
    sync_engine = store._thread.engine if store._thread is not None else store.engine.sync_engine

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _seen(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    tracemalloc.start()
    claim_s, due_s = [], []
    for _ in range(claims):
        t0 = time.perf_counter()
        [order] = await store.claim_due("scale", now=NOW, lease_seconds=60, limit=1)
        claim_s.append(time.perf_counter() - t0)
        await store.release(order.id, order.fence)
        t0 = time.perf_counter()
        await store.next_due_at()
        due_s.append(time.perf_counter() - t0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    event.remove(sync_engine, "before_cursor_execute", _seen)

    plans = {}
    prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
    markers = (("claim", "lease_owner="), ("next due", "SELECT orders.next_run_at, orders.lease"))
    for name, marker in markers:
        sql, params = next(s for s in statements if marker in s[0].replace(" = ", "="))

        def explain(conn: Any, sql: str = sql, params: Any = params) -> list[str]:
            rows = conn.exec_driver_sql(prefix + sql, params).all()
            return [str(r[-1]) for r in rows]

        plans[name] = await store._run(explain, write=False)
    await store.close()
    return {
        "claim_ms": _ms(claim_s),
        "next_due_ms": _ms(due_s),
        "rss_kib": _rss_kib(),
        "traced_peak_kib": peak / 1024,
        "plans": plans,
    }


def _run_child(url: str, claims: int) -> tuple[float, dict[str, Any], dict[str, Any]]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.scale", "--child", url, "--claims", str(claims)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    ready_line = proc.stdout.readline()
    ready_s = time.perf_counter() - started
    rest = proc.stdout.read()
    if proc.wait() != 0 or not ready_line:
        raise RuntimeError(f"the worker process failed (exit {proc.returncode})")
    return ready_s, json.loads(ready_line)["ready"], json.loads(rest)


def run(sizes: Sequence[int], due: int, claims: int, backends: Sequence[str]) -> list[Report]:
    report = Report(
        "scale: a worker with N orders stored (most Installed, not due)",
        [
            "backend",
            "orders",
            "fill s",
            "start-up s",
            "start-up RSS MiB",
            "claim p50 ms",
            "claim p95 ms",
            "next due p50 ms",
            "next due p95 ms",
            "RSS MiB",
            "traced peak KiB",
        ],
        params={"due": due, "claims": claims},
    )
    plans: list[str] = []
    for backend in backends:
        for size in sizes:
            with temporary_database(backend) as url:
                fill_s = fill(url, size, due)
                ready_s, ready, out = _run_child(url, claims)
            report.add(
                backend=backend,
                orders=size,
                **{
                    "fill s": fill_s,
                    "start-up s": ready_s,
                    "start-up RSS MiB": ready["rss_kib"] / 1024,
                    "claim p50 ms": out["claim_ms"]["p50"],
                    "claim p95 ms": out["claim_ms"]["p95"],
                    "next due p50 ms": out["next_due_ms"]["p50"],
                    "next due p95 ms": out["next_due_ms"]["p95"],
                    "RSS MiB": out["rss_kib"] / 1024,
                    "traced peak KiB": out["traced_peak_kib"],
                },
            )
            if size == max(sizes):
                for statement, lines in out["plans"].items():
                    plans.append(f"{backend} {statement} plan, {size} orders:")
                    plans.extend(f"    {line}" for line in lines)
    report.notes.append(
        "start-up: spawn to ready (imports, Store.open, Worker.prepare, first claim and"
        " next-due read); targets (issue 11): claim latency and memory flat from 1,000 to"
        " 100,000 orders"
    )
    report.notes.extend(plans)
    return [report]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--sizes", default="1000,100000", help="comma-separated")
    parser.add_argument("--due", type=int, default=200, help="orders due now (New)")
    parser.add_argument("--claims", type=int, default=300)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.claims))), flush=True)
        return
    sizes = [int(n) for n in args.sizes.split(",") if n.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if any(n < args.due for n in sizes) or args.due < 1 or args.claims < 1:
        parser.error("--sizes must be at least --due; --due and --claims positive")
    if "postgresql" in backends and (reason := pg_unavailable_reason()):
        parser.error(reason)
    emit(run(sizes, args.due, args.claims, backends), args.json)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
