"""Real end-to-end issuance latency on the local stack: Pebble (real DNS-01 validation against
pebble-challtestsrv), the local broker (PeerID auth, real libp2p dial-back) and a py-libp2p
node per peer, driven by :class:`autotls.AutoTLS` with a SQLite store, exactly as the demo.

Two runs against one stack, for each poll setting:

* **sequential**: ``--runs`` issuances one after the other, each a new peer identity: time
  from ``AutoTLS.start`` to the certificate being installed (p50/p95/max), ACME requests per
  issuance, and where the time goes (median seconds spent in each state);
* **concurrent**: ``--peers`` (a list of counts) peers started together against the same
  Pebble and broker: wall time until all hold a certificate, issuances/s, per-peer p50/p95.

Poll settings: ``product`` is :class:`autotls.fsm.ports.EngineSettings` as shipped (TXT checked
every
5 s, authorization every 2 s, order every 1 s -- sized for Let's Encrypt); ``fast`` polls every
0.2 s, which shows what the engine itself costs once the waiting is taken out.

``python -m bench.issuance [--runs 10] [--peers 4,16] [--polls product,fast] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from autotls.demo import LISTEN
from autotls.fsm.machine import ISSUANCE_PATH, State
from autotls.fsm.ports import EngineSettings
from autotls.fsm.worker import OrderEvent
from autotls.localstack.pebble import PebbleOptions, pebble_available
from autotls.localstack.stack import LocalStack
from autotls.node import Libp2pNode
from autotls.peerid import PrivateKey
from autotls.persistence.store import Store
from autotls.persistence.urls import DATABASE_FILE
from autotls.service import AutoTLS
from bench._common import Report, add_json_flag, emit, percentile

ISSUANCE_TIMEOUT_S = 120.0
FAST = timedelta(milliseconds=200)
POLLS = {
    "product": EngineSettings(),
    "fast": EngineSettings(
        dns_poll_interval=FAST, authz_poll_interval=FAST, order_poll_interval=FAST
    ),
}
# The states an issuance passes through, in order, for the breakdown columns.
PATH = ISSUANCE_PATH[:-1]


@dataclass
class Issuance:
    seconds: float
    acme_requests: int
    in_state: dict[str, float] = field(default_factory=dict)  # seconds spent in each state


async def prepare_peer(workdir: Path) -> tuple[PrivateKey, Path]:
    """A new identity and its data directory with the store's schema already in place.

    Migrating here, one peer at a time, is a workaround: Alembic's ``context`` is
    process-global, so two ``Store.open`` calls migrating two fresh databases at the same
    moment in one process corrupt each other's upgrade ("table ... already exists")."""
    key = PrivateKey.generate()
    data_dir = workdir / key.peer_id.to_base36()
    data_dir.mkdir(parents=True)
    await (await Store.open(f"sqlite:///{data_dir / DATABASE_FILE}")).close()
    return key, data_dir


async def issue_one(
    stack: LocalStack, peer: tuple[PrivateKey, Path], settings: EngineSettings
) -> Issuance:
    key, data_dir = peer
    auto = AutoTLS(key, data_dir=data_dir, settings=settings, **stack.client_options())
    entered: dict[str, float] = {}
    in_state: dict[str, float] = defaultdict(float)

    def on_transition(event: OrderEvent) -> None:
        if event.trigger is None:
            return  # a wait or a retry: still in the same state
        now = time.perf_counter()
        in_state[event.from_state] += now - entered.get(event.from_state, now)
        entered[event.to_state] = now

    auto.on("transition", on_transition)
    node = Libp2pNode(key, listen=LISTEN, autotls=auto)
    async with node:
        started = time.perf_counter()
        entered[State.NEW.value] = started
        async with auto:
            await asyncio.wait_for(auto.wait_for_certificate(), ISSUANCE_TIMEOUT_S)
            seconds = time.perf_counter() - started
            requests = auto.acme_requests
    return Issuance(seconds, requests, dict(in_state))


async def run(runs: int, peers: Sequence[int], polls: Sequence[str]) -> list[Report]:
    sequential = Report(
        "issuance: sequential, one peer at a time (local stack, real DNS-01 validation)",
        ["polls", "runs", "p50 s", "p95 s", "max s", "ACME req/issuance"]
        + [f"{s.value} s" for s in PATH],
        params={"runs": runs},
    )
    concurrent = Report(
        "issuance: concurrent peers against one Pebble and broker",
        [
            "polls",
            "peers",
            "all done s",
            "issuances/s",
            "per-peer p50 s",
            "per-peer p95 s",
            "ACME req/issuance",
        ],
        params={"peers": list(peers)},
    )
    with tempfile.TemporaryDirectory(prefix="autotls-bench-") as tmp:
        workdir = Path(tmp)
        async with LocalStack(workdir / "stack", pebble_options=PebbleOptions()) as stack:
            for name in polls:
                settings = POLLS[name]
                # One issuance first: the first account registration, imports and caches
                # would otherwise land in the first sample.
                await issue_one(stack, await prepare_peer(workdir), settings)
                done = [
                    await issue_one(stack, await prepare_peer(workdir), settings)
                    for _ in range(runs)
                ]
                seconds = [d.seconds for d in done]
                sequential.add(
                    polls=name,
                    runs=runs,
                    **{
                        "p50 s": percentile(seconds, 50),
                        "p95 s": percentile(seconds, 95),
                        "max s": max(seconds),
                        "ACME req/issuance": statistics.mean(d.acme_requests for d in done),
                    },
                    **{
                        f"{s.value} s": statistics.median(
                            d.in_state.get(s.value, 0.0) for d in done
                        )
                        for s in PATH
                    },
                )
                for count in peers:
                    ready = [await prepare_peer(workdir) for _ in range(count)]
                    started = time.perf_counter()
                    together = await asyncio.gather(*(issue_one(stack, p, settings) for p in ready))
                    wall = time.perf_counter() - started
                    per_peer = [d.seconds for d in together]
                    concurrent.add(
                        polls=name,
                        peers=count,
                        **{
                            "all done s": wall,
                            "issuances/s": count / wall,
                            "per-peer p50 s": percentile(per_peer, 50),
                            "per-peer p95 s": percentile(per_peer, 95),
                            "ACME req/issuance": statistics.mean(d.acme_requests for d in together),
                        },
                    )
    sequential.notes.append(
        "time from AutoTLS.start (node already listening) to the certificate installed;"
        " state columns: median seconds spent in that state (the step leaving it included)"
    )
    sequential.notes.append("ACME requests include the directory, nonces and every poll")
    return [sequential, concurrent]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.issuance", description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--peers", default="4,16", help="comma-separated peer counts")
    parser.add_argument("--polls", default="product,fast", help="comma-separated: product, fast")
    add_json_flag(parser)
    args = parser.parse_args(argv)
    polls = [p.strip() for p in args.polls.split(",") if p.strip()]
    peers = [int(n) for n in args.peers.split(",") if n.strip()]
    if args.runs < 1 or any(n < 1 for n in peers) or not polls or set(polls) - set(POLLS):
        parser.error("--runs and --peers must be positive; --polls among: product, fast")
    if not pebble_available():
        parser.error("pebble and pebble-challtestsrv must be on PATH")
    logging.basicConfig(level=logging.ERROR)
    emit(asyncio.run(run(args.runs, peers, polls)), args.json)


if __name__ == "__main__":
    main()
