"""DNS-01 plumbing latency against pebble-challtestsrv: publishing a TXT record through its
management API (what the local broker does) and checking it with the engine's real DNS port,
:class:`autotls.dnscheck.AuthoritativeTxtChecker` (one UDP query per authoritative server).

Figures: publish (clear + set) latency, check latency for a visible record and for a missing
one (NXDOMAIN), each sequential and with ``--concurrency`` checks in flight at once
(p50/p95/p99 ms and checks/s).

``python -m bench.dns [--records 1000] [--concurrency 16] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from autotls.dnscheck import AuthoritativeTxtChecker, parse_nameserver
from autotls.fsm.steps import txt_name
from autotls.localstack.pebble import PebbleOptions, PebbleStack, pebble_available
from autotls.peerid import PrivateKey
from bench._common import Report, add_json_flag, emit, percentile


def _value(peer: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(peer.encode()).digest()).decode().rstrip("=")


async def _timed(
    calls: Sequence[Callable[[], Awaitable[object]]], concurrency: int
) -> tuple[list[float], float]:
    """Run ``calls`` with at most ``concurrency`` in flight; per-call ms and total seconds."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            t0 = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - t0) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in calls))
    return latencies, time.perf_counter() - started


async def run(records: int, concurrency: int) -> Report:
    report = Report(
        "dns: publish and check TXT records at pebble-challtestsrv",
        ["operation", "in flight", "count", "p50 ms", "p95 ms", "p99 ms", "per s"],
        params={"records": records},
    )
    peers = [PrivateKey.generate().peer_id.to_base36() for _ in range(records)]
    with (
        tempfile.TemporaryDirectory(prefix="autotls-bench-") as tmp,
        PebbleStack(Path(tmp), PebbleOptions()) as stack,
    ):
        host, port = stack.dns_address
        checker = AuthoritativeTxtChecker(nameservers=[parse_nameserver(f"{host}:{port}")])
        names = {peer: txt_name(peer, "libp2p.direct") for peer in peers}

        async def publish(peer: str) -> None:
            await stack.clear_txt(names[peer])
            await stack.set_txt(names[peer], _value(peer))

        async def check(peer: str, *, expect_visible: bool) -> None:
            result = await checker.check_txt(names[peer], _value(peer))
            if result.visible != expect_visible:
                raise RuntimeError(f"{names[peer]}: expected visible={expect_visible}, {result}")

        # Before publishing: every name is missing.
        rows: list[tuple[str, int, list[Callable[[], Awaitable[object]]]]] = []
        for in_flight in (1, concurrency):
            rows.append(
                (
                    "check missing",
                    in_flight,
                    [functools.partial(check, p, expect_visible=False) for p in peers],
                )
            )
        rows.append(("publish", 1, [functools.partial(publish, p) for p in peers]))
        for in_flight in (1, concurrency):
            rows.append(
                (
                    "check visible",
                    in_flight,
                    [functools.partial(check, p, expect_visible=True) for p in peers],
                )
            )
        for operation, in_flight, calls in rows:
            latencies, seconds = await _timed(calls, in_flight)
            report.add(
                operation=operation,
                count=len(calls),
                **{
                    "in flight": in_flight,
                    "p50 ms": percentile(latencies, 50),
                    "p95 ms": percentile(latencies, 95),
                    "p99 ms": percentile(latencies, 99),
                    "per s": len(calls) / seconds,
                },
            )
    report.notes.append("publish = clear-txt + set-txt over HTTP, one new aiohttp session each")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if args.records < 1 or args.concurrency < 1:
        parser.error("--records and --concurrency must be positive")
    if not pebble_available():
        parser.error("pebble and pebble-challtestsrv must be on PATH")
    emit([asyncio.run(run(args.records, args.concurrency))], args.json)


if __name__ == "__main__":
    main()
