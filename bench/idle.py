"""Idle cost: what a running ``autotls run`` holding a valid certificate costs while nothing
is due (issue 11 §3: it should sleep until the next due time, not poll).

On the local stack (Pebble, challtestsrv, the local broker), one ``autotls run`` process per
backend with the shipped settings (no ``--store-poll``), started as
:mod:`bench.operator` starts one. Once its certificate is installed and a few seconds have
passed, the process is watched for ``--seconds`` from outside, through ``/proc``: CPU
(user + system, all threads), RSS, and voluntary context switches of all its threads --
each one a thread going to sleep, i.e. about one wake-up -- per second. CPU per hour is the
window's CPU scaled to an hour. The next due time (the renewal) is weeks away, so every
wake-up in the window is a timer or a poll of the process's own.

``python -m bench.idle [--seconds 60] [--backends sqlite,postgresql] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from autotls.localstack.pebble import pebble_available
from autotls.localstack.stack import LocalStack
from bench._common import Report, add_json_flag, emit, pg_database, pg_unavailable_reason
from bench.operator import Node

SETTLE_S = 5.0
COLUMNS = [
    *("backend", "seconds", "CPU s/hour", "CPU % of a core", "RSS MiB"),
    *("wake-ups/s", "threads", "next due in"),
]


def _sample(pid: int) -> tuple[float, int, int, int]:
    """(CPU seconds, RSS KiB, voluntary context switches of all threads, threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().partition(") ")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    switches = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        threads += 1
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                switches += int(line.split()[1])
    return cpu, rss, switches, threads


async def measure(stack: LocalStack, backend: str, database: str, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-idle-{backend}-") as tmp:
        node = Node(stack, Path(tmp), database, store_poll=None)
        await node.start()
        try:
            snap = await node.until_installed(None)
            if node.store is not None:  # ours, not the node's: close it before watching
                await node.store.close()
                node.store = None
            await asyncio.sleep(SETTLE_S)
            assert node.process is not None
            pid = node.process.pid
            cpu0, _, switches0, _ = _sample(pid)
            started = time.monotonic()
            await asyncio.sleep(seconds)
            cpu1, rss, switches1, threads = _sample(pid)
            elapsed = time.monotonic() - started
        finally:
            await node.stop()
    due_in = snap.next_run_at - snap.updated_at
    return {
        "backend": backend,
        "seconds": elapsed,
        "CPU s/hour": (cpu1 - cpu0) * 3600 / elapsed,
        "CPU % of a core": (cpu1 - cpu0) * 100 / elapsed,
        "RSS MiB": rss / 1024,
        "wake-ups/s": (switches1 - switches0) / elapsed,
        "threads": threads,
        "next due in": f"{due_in.days} d",
    }


async def run(seconds: float, backends: Sequence[str]) -> list[Report]:
    report = Report(
        "idle autotls run holding a valid certificate", COLUMNS, params={"seconds": seconds}
    )
    with tempfile.TemporaryDirectory(prefix="bench-idle-stack-") as tmp:
        async with LocalStack(Path(tmp) / "stack") as stack:
            for backend in backends:
                if backend == "postgresql":
                    with pg_database() as url:
                        report.add(**await measure(stack, backend, url, seconds))
                else:
                    db = f"sqlite:///{Path(tmp) / 'node.db'}"
                    report.add(**await measure(stack, backend, db, seconds))
    report.notes.append(
        "wake-ups/s: voluntary context switches of all the process's threads per second (a"
        " thread that sleeps and wakes counts one); CPU s/hour: the window's CPU scaled to an"
        " hour. Target (issue 11): sleep until the next due time, not poll"
    )
    return [report]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backends", default="sqlite,postgresql")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not pebble_available():
        parser.error("pebble and pebble-challtestsrv are needed on PATH")
    if "postgresql" in backends and (reason := pg_unavailable_reason()):
        parser.error(reason)
    emit(asyncio.run(run(args.seconds, backends)), args.json)


if __name__ == "__main__":
    main()
