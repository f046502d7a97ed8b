"""Run every benchmark with its defaults (or ``--quick`` sizes) and print all the figures.

``python -m bench.run_all [--quick] [--json]
[--only store,engine,fleet,scale,dns,issuance,peers,operator,idle]``

Benchmarks whose components are missing (PostgreSQL, Pebble, lego and certbot for ``peers``)
are reported as skipped, never failed: the figures are for reading, not for gating. Unlike
``python -m bench.peers``, this installs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from autotls.localstack.pebble import pebble_available
from bench import dns, engine, idle, issuance, scale, store
from bench import operator as operator_bench
from bench import peers as peers_bench
from bench._common import Report, add_json_flag, emit, pg_unavailable_reason

ALL = ("store", "engine", "fleet", "scale", "dns", "issuance", "peers", "operator", "idle")


def _skipped(name: str, reason: str) -> Report:
    report = Report(f"{name}: skipped", ["reason"])
    report.add(reason=reason)
    return report


def collect(names: Sequence[str], quick: bool) -> list[Report]:
    reports: list[Report] = []
    for name in names:
        print(f"running bench.{name} ...", file=sys.stderr, flush=True)
        if name == "store":
            orders = 200 if quick else 1000
            reports.append(asyncio.run(store.run(orders, [1, 4, 16], ["sqlite", "postgresql"])))
        elif name == "engine":
            orders, sizes = (50, [50, 100]) if quick else (200, [100, 300])
            reports.extend(asyncio.run(engine.run(orders, [1, 4], sizes, "sqlite")))
        elif name in ("fleet", "scale") and (reason := pg_unavailable_reason()):
            reports.append(_skipped(name, reason))
        elif name == "fleet":
            orders = 50 if quick else 200
            reports.append(engine.run_processes(orders, [1, 4], 1, "postgresql"))
        elif name == "scale":
            sizes = [1000, 10_000] if quick else [1000, 100_000]
            reports.extend(scale.run(sizes, 200, 100 if quick else 300, ["sqlite", "postgresql"]))
        elif name == "operator":  # reports by itself what it lacks (Pebble, PostgreSQL)
            backends = ["sqlite", "postgresql"]
            reports.extend(asyncio.run(operator_bench.run(5 if quick else 20, backends)))
        elif not pebble_available():
            reports.append(_skipped(name, "pebble and pebble-challtestsrv are not on PATH"))
        elif name == "idle":
            backends = ["sqlite"] if pg_unavailable_reason() else ["sqlite", "postgresql"]
            reports.extend(asyncio.run(idle.run(20.0 if quick else 60.0, backends)))
        elif name == "dns":
            reports.append(asyncio.run(dns.run(200 if quick else 1000, 16)))
        elif name == "issuance":
            runs, peers = (3, [4]) if quick else (10, [4, 16])
            rejects = [0, 20] if quick else [0, 20, 50]
            reports.extend(asyncio.run(issuance.run(runs, peers, ["product"], rejects)))
        elif name == "peers":
            try:
                tools = peers_bench.find_tools(
                    peers_bench.TOOLS, peers_bench.default_venvs(), install=False
                )
            except peers_bench.Missing as exc:
                reports.append(_skipped(name, f"{exc} (python -m bench.peers installs them)"))
                continue
            reports.extend(peers_bench.collect(tools, 2 if quick else 5, [0] if quick else [0, 20]))
    return reports


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated subset")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(ALL)):
        parser.error(f"unknown benchmarks {unknown}; known: {', '.join(ALL)}")
    emit(collect(names, args.quick), args.json)


if __name__ == "__main__":
    main()
