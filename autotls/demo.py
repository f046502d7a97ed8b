"""``autotls demo``: issue a real certificate on this machine, end to end, and prove it.

1. Bring up the local stack on loopback (Pebble + challtestsrv on free ports with a fresh
   TLS certificate, the local broker).
2. Start a py-libp2p node with a persisted identity key (``<workdir>/identity.key``), a TCP
   listener (for the broker's dial-back) and a secure WebSocket listener serving AutoTLS's
   live ``SSLContext``.
3. Run the engine with SQLite until the order is Installed, reporting every transition.
4. Prove it: a TLS handshake with SNI ``<ip-label>.<peer>.libp2p.direct`` against the node's
   secure WebSocket listener, verified with Pebble's root, must present the certificate the
   engine installed.

Everything started is stopped on exit, on errors and on Ctrl-C. The database and data
directory stay in ``<workdir>`` for ``autotls status`` / ``diagram``; the next demo run
starts them afresh (they belong to a Pebble that no longer exists).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from autotls.fsm.machine import State
from autotls.fsm.worker import OrderEvent
from autotls.install import FULLCHAIN
from autotls.localstack.pebble import PebbleOptions
from autotls.localstack.stack import LocalStack
from autotls.multiaddrs import Multiaddr, ip_label
from autotls.node import Libp2pNode
from autotls.peerid import PrivateKey, load_private_key, save_private_key
from autotls.persistence.urls import DATABASE_FILE
from autotls.service import AutoTLS

DEFAULT_WORKDIR = Path(".autotls-demo")
IDENTITY_FILE = "identity.key"
ISSUANCE_TIMEOUT_S = 120.0
LISTEN = ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws")


@dataclass
class DemoResult:
    peer_id: str
    label: str
    domain: str
    state: str
    cert_path: str | None
    not_after: str | None
    addresses: list[str]
    acme_requests: int
    elapsed_s: float
    tls_verified: bool
    order_id: int | None = None
    database: str | None = None
    data_dir: str | None = None
    transitions: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == State.INSTALLED.value and self.tls_verified

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def identity(workdir: Path) -> PrivateKey:
    """The demo node's identity: created on the first run, reused afterwards."""
    path = workdir / IDENTITY_FILE
    if path.exists():
        return load_private_key(path)
    key = PrivateKey.generate()
    save_private_key(key, path)
    return key


def prepare_workdir(workdir: Path) -> tuple[Path, PrivateKey]:
    """Absolute workdir with the persisted identity; the previous run's database, certificates
    and stack files removed (they belong to a Pebble that no longer runs)."""
    workdir = Path(os.path.abspath(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    key = identity(workdir)
    for stale in (workdir / DATABASE_FILE, workdir / "certs", workdir / "stack"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    for suffix in ("-wal", "-shm"):
        (workdir / (DATABASE_FILE + suffix)).unlink(missing_ok=True)
    return workdir, key


async def tls_check(
    host: str, port: int, server_name: str, roots_pem: list[str], expect_sha256: str
) -> tuple[bool, str]:
    """Handshake with SNI ``server_name``, verify against ``roots_pem``, and compare the
    presented leaf with the one we installed."""
    context = ssl.create_default_context(cadata="".join(roots_pem))
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=server_name), 15
        )
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return False, f"handshake with {server_name} at {host}:{port} failed: {exc}"
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    finally:
        # Only the handshake matters; py-libp2p's WebSocket server never answers a TLS
        # close_notify from a client that spoke no WebSocket, so don't wait for one.
        writer.transport.abort()
    if der is None:
        return False, "no certificate presented"
    served = hashlib.sha256(der).hexdigest()
    if served != expect_sha256:
        return False, f"listener serves {served[:16]}..., not the installed {expect_sha256[:16]}..."
    return True, f"verified {server_name} at {host}:{port}"


async def run_demo(
    workdir: Path = DEFAULT_WORKDIR,
    *,
    progress: Callable[[str], None] = lambda _line: None,
    timeout_s: float = ISSUANCE_TIMEOUT_S,
) -> DemoResult:
    started = time.monotonic()
    workdir, key = prepare_workdir(workdir)
    label = key.peer_id.to_base36()

    def say(line: str) -> None:
        progress(f"[{time.monotonic() - started:6.2f}s] {line}")

    result = DemoResult(
        peer_id=key.peer_id.to_base58(),
        label=label,
        domain=f"*.{label}.libp2p.direct",
        state=State.NEW.value,
        cert_path=None,
        not_after=None,
        addresses=[],
        acme_requests=0,
        elapsed_s=0.0,
        tls_verified=False,
        database=str(workdir / DATABASE_FILE),
        data_dir=str(workdir),
    )
    installed = asyncio.Event()

    def on_transition(event: OrderEvent) -> None:
        if event.trigger is not None:
            result.transitions.append(event.trigger)
            say(f"{event.from_state} -> {event.to_state} ({event.trigger})")
        elif event.error_class:
            say(f"{event.from_state}: {event.error_class} error, retrying: {event.message}")
        result.state = event.to_state
        if event.to_state in (State.INSTALLED.value, State.FAILED.value):
            installed.set()

    say("starting Pebble, pebble-challtestsrv and the local broker")
    async with LocalStack(workdir / "stack", pebble_options=PebbleOptions()) as stack:
        say(f"ACME {stack.pebble.directory_url}, broker {stack.broker_url}, DNS {stack.dns_server}")
        auto = AutoTLS(key, data_dir=workdir, **stack.client_options())
        auto.on("transition", on_transition)
        node = Libp2pNode(key, listen=LISTEN, autotls=auto)
        async with node:
            say(f"libp2p node {result.peer_id} on {', '.join(node.listen_addresses)}")
            async with auto:
                result.order_id = auto.order_id
                try:
                    await asyncio.wait_for(installed.wait(), timeout_s)
                except TimeoutError:
                    snap = await auto.order()
                    result.error = (
                        f"not installed after {timeout_s:.0f}s: order {snap.id} is {snap.state}"
                        + (f" ({snap.last_error_message})" if snap.last_error_message else "")
                    )
                snap = await auto.order()
                result.state = snap.state
                result.acme_requests = auto.acme_requests
                if snap.state == State.FAILED.value:
                    result.error = f"order failed: {snap.last_error_message}"
                cert = auto.certificate
                if snap.state == State.INSTALLED.value and cert is not None:
                    result.cert_path = str(cert.chain_path)
                    result.not_after = cert.not_after.isoformat()
                    result.addresses = auto.forge_addresses(node.listen_addresses)
                    result.tls_verified = await _prove(auto, node, stack, say)
                    if not result.tls_verified:
                        result.error = "TLS verification failed"
    say("local stack stopped")
    result.elapsed_s = round(time.monotonic() - started, 3)
    return result


async def _prove(
    auto: AutoTLS, node: Libp2pNode, stack: LocalStack, say: Callable[[str], None]
) -> bool:
    wss = next(
        (Multiaddr.parse(a) for a in node.listen_addresses if "/tls/" in a or "/wss" in a), None
    )
    if wss is None or auto.certificate is None:
        say("no secure WebSocket listener to check")
        return False
    ip = wss.value("ip4") or wss.value("ip6") or "127.0.0.1"
    port = int(wss.value("tcp") or 0)
    server_name = f"{ip_label(ip)}.{auto.peer_id}.libp2p.direct"
    chain = (auto.installer.certificate_dir(auto.peer_id) / FULLCHAIN).read_text()
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    expected = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    ok, detail = await tls_check(ip, port, server_name, stack.pebble.issuer_roots_pem(), expected)
    say(("TLS OK: " if ok else "TLS FAILED: ") + detail)
    return ok
