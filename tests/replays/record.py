"""Record the committed transcripts of tests/replays/ again: ``python -m tests.replays.record``.

Each scenario is a behaviour no local server produces by itself, recorded live: the real
worker, steps, policy and adapters (through a :class:`~autotls.recording.Recorder`) against

* the fake Let's Encrypt CA of the test suite (:class:`tests.fakes.acme_server.FakeAcmeServer`,
  plain HTTP on loopback: ARI, Retry-After, ``alreadyReplaced``, unknown challenge types,
  injected problems with Let's Encrypt's own wording), whose DNS-01 validation looks the TXT
  record up in pebble-challtestsrv, as Let's Encrypt asks the zone's servers;
* the local broker (:class:`autotls.localstack.broker.LocalBroker`), which dials a real
  py-libp2p node back and publishes the TXT record in challtestsrv -- for the 502 storm
  behind the test suite's fault proxy (:mod:`tests.fixtures.faultproxy`);
* the node's own TXT check, asked of challtestsrv.

The engine's clock is a manual clock starting at :data:`START` (the fake CA and the installer
read it too), its random source is seeded, and each scenario's identity key is derived from its
name, so a new recording differs from the last only where a server picks at random (order and
authorization URLs, tokens, serials, keys, ports). Usage::

    python -m tests.replays.record                   # every scenario, into tests/replays/
    python -m tests.replays.record finalize-processing --out /tmp/replays

Re-run it when the engine changes the port calls it makes (``autotls replay`` then says "THE
EXCHANGES DIFFER"); review the diff of the journals (``autotls replay FILE``) before committing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import random
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rdatatype
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from autotls.adapters import AcmeAdapter, BrokerAdapter
from autotls.cli.logs import quiet_libp2p
from autotls.dnscheck import AuthoritativeTxtChecker, NameServer, txt_values
from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.faults import FaultPlan
from autotls.fsm.machine import State
from autotls.fsm.ports import EngineSettings, Ports
from autotls.fsm.worker import Worker, run_until_idle
from autotls.install import Installer
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleOptions, PebbleStack
from autotls.node import Libp2pNode
from autotls.peerid import PrivateKey
from autotls.persistence.store import Store
from autotls.recording import Recorder, read_transcript, transcript_path
from tests.fakes.acme_server import DNS_PERSIST_01, FakeAcmeServer
from tests.fixtures.faultproxy import (
    Fault,
    FaultKind,
    FaultLog,
    FaultProxy,
    FaultScript,
    broker_success,
    classify_broker,
)

HERE = Path(__file__).resolve().parent
START = datetime(2026, 3, 2, tzinfo=UTC)
# Let's Encrypt's words (boulder ratelimits and wfe), so the transcripts read like production.
LE_RATE_LIMITED = (
    "too many certificates (5) already issued for this exact set of identifiers in the last "
    "168h0m0s, retry after 2026-03-02 01:00:00 UTC: see "
    "https://letsencrypt.org/docs/rate-limits/#new-certificates-per-exact-set-of-identifiers"
)
LE_ALREADY_REPLACED = (
    "cannot indicate an order replaces certificate with serial {serial}, which already has "
    "a replacement order"
)


@dataclass
class Run:
    """What a scenario acts on while it is recorded."""

    ca: FakeAcmeServer
    store: Store
    order_id: int
    script: FaultScript
    marks: set[str] = field(default_factory=set)  # one-off actions already taken

    async def state(self) -> str:
        return (await self.store.get_order(self.order_id)).state

    async def certificates(self) -> int:
        return len(await self.store.certificates(order_id=self.order_id))


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    setup: Callable[[FakeAcmeServer, FaultScript], None]
    # Checked before every round: True ends the recording. May act on the run first.
    done: Callable[[Run], Awaitable[bool]]
    lifetime: timedelta | None = None  # of the fake CA's certificates (None: Let's Encrypt's)
    validator_fails: int = 0  # DNS-01 validations the fake CA fails before checking for real


async def installed(run: Run) -> bool:
    return await run.state() == State.INSTALLED.value


async def renewed_after_already_replaced(run: Run) -> bool:
    """Installed, then (when the renewal's newOrder comes) 409 alreadyReplaced, then a
    renewal without ``replaces`` installed."""
    if "armed" not in run.marks and await installed(run):
        serial = next(iter(run.ca.certificates.values())).certificate.serial_number
        run.ca.fail_next(
            "newOrder",
            status=409,
            problem_type="alreadyReplaced",
            detail=LE_ALREADY_REPLACED.format(serial=f"{serial:036x}"),
        )
        run.marks.add("armed")
    return await run.certificates() == 2 and await installed(run)


def _nothing(ca: FakeAcmeServer, script: FaultScript) -> None:
    pass


def _rate_limited(ca: FakeAcmeServer, script: FaultScript) -> None:
    ca.fail_next(
        "newOrder",
        status=429,
        problem_type="rateLimited",
        detail=LE_RATE_LIMITED,
        retry_after="3600",
    )


def _finalize_processing(ca: FakeAcmeServer, script: FaultScript) -> None:
    ca.order_processing_polls = 2
    ca.order_retry_after = "3"


def _unknown_challenge(ca: FakeAcmeServer, script: FaultScript) -> None:
    ca.extra_challenges = [dict(DNS_PERSIST_01)]


def _already_replaced(ca: FakeAcmeServer, script: FaultScript) -> None:
    ca.ari_retry_after = "21600"


def _broker_storm(ca: FakeAcmeServer, script: FaultScript) -> None:
    script.load(
        {
            "challenge_leg": [Fault(FaultKind.HTML_502, times=3)],
            "registration_leg": [Fault(FaultKind.HTML_502, times=2)],
        }
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "rate-limited",
            "newOrder answered 429 rateLimited with Retry-After: 3600 (Let's Encrypt's words); "
            "the order waits exactly that long, then is issued",
            _rate_limited,
            installed,
        ),
        Scenario(
            "already-replaced",
            "a renewal inside the CA's ARI window sends replaces; the CA answers 409 "
            "alreadyReplaced; the order drops replaces and renews without it",
            _already_replaced,
            renewed_after_already_replaced,
            lifetime=timedelta(days=1),
        ),
        Scenario(
            "authz-invalid",
            "the CA's DNS-01 validation fails once: the authorization goes invalid, the "
            "order is counted against the validation budget and placed again",
            _nothing,
            installed,
            validator_fails=1,
        ),
        Scenario(
            "finalize-processing",
            "finalize answers processing with Retry-After: 3, and the order stays "
            "processing for two more polls",
            _finalize_processing,
            installed,
        ),
        Scenario(
            "unknown-challenge",
            "the authorization lists a dns-persist-01 challenge (unknown to us, with fields "
            "of its own) before dns-01",
            _unknown_challenge,
            installed,
        ),
        Scenario(
            "broker-502-storm",
            "the broker's load balancer answers HTML 502 pages: three to the PeerID-auth "
            "challenge leg, then two to the registration leg; backoff, then accepted",
            _broker_storm,
            installed,
        ),
    )
}


def identity_for(name: str) -> PrivateKey:
    """A scenario's identity key, the same at every recording (a test key, nothing else)."""
    seed = hashlib.sha256(f"autotls replay scenario {name}".encode()).digest()
    return PrivateKey.from_cryptography(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def dns_validator(pebble: PebbleStack, failures: int) -> Callable[[str, str], Awaitable[bool]]:
    """The fake CA's DNS-01 check: the TXT record as challtestsrv serves it (after
    ``failures`` validations that fail whatever the record says)."""
    left = [failures]
    host, port = pebble.dns_address

    async def validate(identifier: str, expected: str) -> bool:
        if left[0] > 0:
            left[0] -= 1
            return False
        name = f"_acme-challenge.{identifier}"
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        answer = await dns.asyncquery.udp(query, host, port=port, timeout=5)
        return expected in txt_values(answer, name)

    return validate


@contextlib.asynccontextmanager
async def challtestsrv() -> AsyncIterator[PebbleStack]:
    """pebble-challtestsrv (with Pebble beside it, which these scenarios do not use)."""
    with tempfile.TemporaryDirectory(prefix="autotls-replays-") as tmp:
        stack = PebbleStack(Path(tmp), PebbleOptions())
        await asyncio.to_thread(stack.start)
        try:
            yield stack
        finally:
            await asyncio.to_thread(stack.stop)


async def record_scenario(scenario: Scenario, pebble: PebbleStack, out: Path) -> Path:
    """Record ``scenario`` live; the transcript is written to ``out/<name>.jsonl``."""
    clock = ManualClock(START)
    with tempfile.TemporaryDirectory(prefix=f"autotls-{scenario.name}-") as tmp_text:
        tmp = Path(tmp_text)
        ca = FakeAcmeServer(
            now=clock.now,
            validator=dns_validator(pebble, scenario.validator_fails),
            default_lifetime=scenario.lifetime,
        )
        script, faults = FaultScript(), FaultLog(clock.now)
        scenario.setup(ca, script)
        identity = identity_for(scenario.name)
        peer = identity.peer_id.to_base36()
        broker = LocalBroker(challtestsrv_url=pebble.challtestsrv_url)
        node = Libp2pNode(identity, listen=["/ip4/127.0.0.1/tcp/0"])
        recorder = Recorder(tmp / "transcripts")
        async with ca, broker:
            proxy = FaultProxy(
                "broker",
                broker.url,
                classify=classify_broker,
                success=broker_success,
                script=script,
                log=faults,
            )
            async with proxy:
                await node.start()
                try:
                    roots = [x509.load_pem_x509_certificate(ca.root_pem.encode())]
                    ports = Ports(
                        acme=AcmeAdapter(
                            ca.directory_url,
                            trust_roots=roots,
                            clock=clock,
                            observer=recorder.http_observer("acme"),
                        ),
                        broker=BrokerAdapter(
                            identity=lambda p: identity if p == peer else None,
                            addresses=lambda _p: node.listen_addresses,
                            base_url=proxy.url,
                            allow_private_addresses=True,
                            observer=recorder.http_observer("broker"),
                        ),
                        dns=AuthoritativeTxtChecker(
                            nameservers=[NameServer(*pebble.dns_address)], clock=clock
                        ),
                        installer=Installer(tmp / "data", trust_roots=roots, clock=clock),
                        clock=clock,
                        settings=EngineSettings(),
                        rng=random.Random(scenario.name),
                    )
                    store = await Store.open(f"sqlite:///{tmp / 'autotls.db'}")
                    try:
                        order = await operator.create_order(
                            store, peer, f"*.{peer}.libp2p.direct", now=clock.now()
                        )
                        run = Run(ca, store, order.id, script)
                        worker = Worker(
                            store,
                            recorder.wrap(ports),
                            worker_id="recording",
                            faults=FaultPlan(),
                            step_observer=recorder,
                        )
                        await run_until_idle(
                            worker,
                            advance_clock=clock.set,
                            stop_when=lambda: scenario.done(run),
                            max_rounds=500,
                        )
                        if not await scenario.done(run):
                            raise RuntimeError(
                                f"{scenario.name}: the order ended in {await run.state()}"
                            )
                        if script.pending:
                            raise RuntimeError(
                                f"{scenario.name}: faults never injected: {script.pending}"
                            )
                    finally:
                        recorder.close()
                        await store.close()
                        await ports.acme.close()  # type: ignore[attr-defined]
                        await ports.broker.close()  # type: ignore[attr-defined]
                finally:
                    await node.stop()
        target = await asyncio.to_thread(
            _keep, transcript_path(tmp / "transcripts", order.id), out, scenario.name
        )
    return target


def _keep(transcript: Path, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.jsonl"
    shutil.copyfile(transcript, target)
    target.chmod(0o644)  # committed files: nothing secret in them
    return target


async def record(names: Sequence[str], out: Path, pebble: PebbleStack | None = None) -> list[Path]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"unknown scenario(s): {', '.join(unknown)} (known: {', '.join(SCENARIOS)})"
        )
    chosen = [SCENARIOS[n] for n in names] if names else list(SCENARIOS.values())
    if pebble is not None:
        return [await record_scenario(s, pebble, out) for s in chosen]
    async with challtestsrv() as started:
        return [await record_scenario(s, started, out) for s in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.replays.record", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=HERE, help="default: tests/replays/")
    args = parser.parse_args(argv)
    # The engine's warnings (each injected fault) are in the transcripts; py-libp2p's chatter
    # about the broker's dial-back connections is nobody's concern here.
    handler = logging.StreamHandler()
    handler.addFilter(lambda record: not record.name.startswith("libp2p"))
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s", handlers=[handler])
    quiet_libp2p(0)  # its loggers propagate to the handler above, which drops them
    for path in asyncio.run(record(args.names, args.out)):
        transcript = read_transcript(path)
        moves = [e["trigger"] for s in transcript.sessions for e in s.journal()]
        print(f"recorded {path} ({path.stat().st_size} bytes): {' '.join(moves)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
