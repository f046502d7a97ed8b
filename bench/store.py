"""Store throughput: claim + commit steps per second and claim latency, SQLite and PostgreSQL.

For each backend and concurrency C: a fresh database holding N orders in New, then C claimers
(one owner id each) sharing one :class:`autotls.persistence.store.Store`, as one worker process with
``concurrency=C`` does. Each claimer loops ``claim_due(limit=1)`` then ``commit`` of a
transition with its journal entry (New -> Registered: the heavier of the two commits a worker
makes; waits write no journal) until nothing is due; every order is stepped exactly once,
which the benchmark checks. No network I/O and no step logic: this is the database's share
of every step.

Figures: steps/s (claim+commit pairs), claim and commit latency percentiles (ms), and
``create_order`` throughput. Run ``python -m bench.store`` from the repository root;
``--orders``, ``--concurrency``, ``--backends`` and ``--json`` change the run. PostgreSQL is
the server in ``AUTOTLS_BENCH_PG`` (or ``AUTOTLS_TEST_PG``, default
``postgresql://postgres@127.0.0.1:5432``); a throw-away database is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from autotls.fsm import operator
from autotls.peerid import PrivateKey
from autotls.persistence.records import CommitPlan, JournalNote
from autotls.persistence.store import CorruptOrder, Store
from bench._common import (
    Report,
    add_json_flag,
    emit,
    percentile,
    pg_database,
    pg_unavailable_reason,
)

LEASE_S = 60.0


def _now() -> datetime:
    return datetime.now(UTC)


def _plan(order_id: int) -> CommitPlan:
    return CommitPlan(
        to_state="Registered",
        data={"bench": order_id},
        next_run_at=_now() + timedelta(days=1),  # not due again during the run
        attempts=0,
        last_error_class=None,
        last_error_message=None,
        last_problem=None,
        journal=JournalNote("transition", "account_ready", {"bench": True}),
    )


async def _fill(store: Store, peers: Sequence[str]) -> float:
    started = time.perf_counter()
    for peer in peers:
        await operator.create_order(
            store, peer, f"*.{peer}.libp2p.direct", now=_now(), actor="bench"
        )
    return len(peers) / (time.perf_counter() - started)


async def _measure(url: str, peers: Sequence[str], concurrency: int) -> dict[str, float]:
    store = await Store.open(url)
    try:
        created_per_s = await _fill(store, peers)
        claim_ms: list[float] = []
        commit_ms: list[float] = []
        stepped: list[int] = []

        async def claimer(owner: str) -> None:
            while True:
                t0 = time.perf_counter()
                claimed = await store.claim_due(owner, now=_now(), lease_seconds=LEASE_S, limit=1)
                claim_ms.append((time.perf_counter() - t0) * 1000)
                if not claimed:
                    # SKIP LOCKED may pass over rows another claimer is taking right now.
                    due = await store.next_due_at()
                    if due is None or due > _now():
                        return
                    continue
                [snap] = claimed
                if isinstance(snap, CorruptOrder):
                    raise RuntimeError(f"corrupt order {snap.id}: {snap.error}")
                t1 = time.perf_counter()
                if not await store.commit(snap, _plan(snap.id), now=_now(), worker=owner):
                    raise RuntimeError(f"order {snap.id}: commit refused without contention")
                commit_ms.append((time.perf_counter() - t1) * 1000)
                stepped.append(snap.id)

        started = time.perf_counter()
        await asyncio.gather(*(claimer(f"bench-{i}") for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        if sorted(stepped) != sorted(set(stepped)) or len(stepped) != len(peers):
            raise RuntimeError(f"{len(stepped)} steps for {len(peers)} orders: some were repeated")
    finally:
        await store.close()
    return {
        "steps_per_s": len(stepped) / elapsed,
        "claim_p50_ms": percentile(claim_ms, 50),
        "claim_p95_ms": percentile(claim_ms, 95),
        "claim_p99_ms": percentile(claim_ms, 99),
        "commit_p50_ms": percentile(commit_ms, 50),
        "commit_p95_ms": percentile(commit_ms, 95),
        "create_per_s": created_per_s,
    }


async def run(orders: int, concurrencies: Sequence[int], backends: Sequence[str]) -> Report:
    report = Report(
        "store: claim+commit throughput",
        [
            "backend",
            "conc",
            "steps/s",
            "claim p50 ms",
            "claim p95 ms",
            "claim p99 ms",
            "commit p50 ms",
            "commit p95 ms",
            "create/s",
        ],
        params={"orders": orders},
    )
    peers = [PrivateKey.generate().peer_id.to_base36() for _ in range(orders)]
    for backend in backends:
        if backend == "postgresql" and (reason := pg_unavailable_reason()):
            report.notes.append(f"postgresql skipped: {reason}")
            continue
        for concurrency in concurrencies:
            if backend == "sqlite":
                with tempfile.TemporaryDirectory(prefix="autotls-bench-") as tmp:
                    figures = await _measure(
                        f"sqlite:///{Path(tmp) / 'bench.db'}", peers, concurrency
                    )
            else:
                with pg_database() as url:
                    figures = await _measure(url, peers, concurrency)
            report.add(
                backend=backend,
                conc=concurrency,
                **{
                    "steps/s": figures["steps_per_s"],
                    "claim p50 ms": figures["claim_p50_ms"],
                    "claim p95 ms": figures["claim_p95_ms"],
                    "claim p99 ms": figures["claim_p99_ms"],
                    "commit p50 ms": figures["commit_p50_ms"],
                    "commit p95 ms": figures["commit_p95_ms"],
                    "create/s": figures["create_per_s"],
                },
            )
    report.notes.append(
        "one process, one Store shared by the claimers (SQLAlchemy pool: 5 + 10 overflow)"
    )
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown or args.orders < 1 or any(c < 1 for c in concurrencies):
        parser.error(f"bad arguments (unknown backends: {sorted(unknown) or 'none'})")
    emit([asyncio.run(run(args.orders, concurrencies, backends))], args.json)


if __name__ == "__main__":
    main()
