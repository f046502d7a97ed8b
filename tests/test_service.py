"""The embedding API against the real local stack and a real py-libp2p node: events, the live
SSLContext behind the node's secure WebSocket listener, restart and restore, failure."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import secrets
import signal
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from sqlalchemy import text

from autotls import AutoTLS, ConfigurationError, IssuanceFailed, PrivateKey
from autotls.fsm import operator
from autotls.fsm.machine import State
from autotls.fsm.ports import EngineSettings
from autotls.fsm.worker import OrderEvent
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleOptions, PebbleStack
from autotls.multiaddrs import Multiaddr, ip_label
from autotls.node import Libp2pNode
from autotls.persistence.errors import OrderBusyError
from autotls.service import DeadlineExceeded

pytestmark = pytest.mark.usefixtures("libp2p_installed")

FAST = EngineSettings(
    dns_poll_interval=timedelta(milliseconds=100),
    authz_poll_interval=timedelta(milliseconds=100),
    order_poll_interval=timedelta(milliseconds=100),
)
LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]


@dataclass
class Setup:
    pebble: PebbleStack
    broker: LocalBroker
    tmp: Path
    key: PrivateKey = field(default_factory=PrivateKey.generate)
    events: list[tuple[str, Any]] = field(default_factory=list)

    def pair(self, **overrides: Any) -> tuple[AutoTLS, Libp2pNode]:
        """An AutoTLS and the node serving its context, wired together by the node (AutoTLS
        reads the node's addresses at each registration)."""
        auto = self.autotls(None, **overrides)
        return auto, Libp2pNode(self.key, listen=LISTEN, autotls=auto)

    def autotls(self, addresses: Any, **overrides: Any) -> AutoTLS:
        roots = [
            c
            for pem in self.pebble.issuer_roots_pem()
            for c in x509.load_pem_x509_certificates(pem.encode())
        ]
        options: dict[str, Any] = {
            "data_dir": self.tmp / "data",
            "addresses": addresses,
            "directory_url": self.pebble.directory_url,
            "ca_file": str(self.pebble.ca_file),
            "broker_url": self.broker.url,
            "dns_servers": ["{}:{}".format(*self.pebble.dns_address)],
            "allow_private_addresses": True,
            "trust_roots": roots,
            "settings": FAST,
            **overrides,
        }
        auto = AutoTLS(self.key, **options)
        for name in ("loaded", "renewed", "failed"):
            auto.on(name, lambda payload, name=name: self.events.append((name, payload)))
        return auto


@pytest.fixture
def setup(pebble: PebbleStack, pebble_broker: LocalBroker, tmp_path: Path) -> Setup:
    return Setup(pebble, pebble_broker, tmp_path)


async def served_fingerprint(node: Libp2pNode, peer: str, roots_pem: list[str]) -> str:
    wss = next(Multiaddr.parse(a) for a in node.listen_addresses if "/tls/" in a)
    context = ssl.create_default_context(cadata="".join(roots_pem))
    _r, writer = await asyncio.open_connection(
        "127.0.0.1",
        int(wss.value("tcp") or 0),
        ssl=context,
        server_hostname=f"{ip_label('127.0.0.1')}.{peer}.libp2p.direct",
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.transport.abort()
    return hashlib.sha256(der).hexdigest()


def leaf_fingerprint(path: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


async def hold_lease(
    auto: AutoTLS, order_id: int, owner: str | None, until: datetime | None
) -> None:
    """Another worker's lease on the order (or none), written as that worker would."""
    async with auto.store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE orders SET lease_owner = :owner, lease_until = :until WHERE id = :id"),
            {
                "owner": owner,
                "until": until.replace(tzinfo=None) if until is not None else None,
                "id": order_id,
            },
        )


async def test_issue_serve_and_renew_live_behind_the_nodes_listener(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto, node = setup.pair()
    async with node, auto:
        assert auto.forge_addresses() == [], "no forge addresses before a certificate"
        async with asyncio.timeout(60):
            cert = await auto.wait_for_certificate()
        assert cert.domain == f"*.{auto.peer_id}.libp2p.direct"
        forge = auto.forge_addresses()
        assert any(a.startswith("/dns4/127-0-0-1.") and a.endswith("/tls/ws") for a in forge)
        roots = setup.pebble.issuer_roots_pem()
        assert await served_fingerprint(node, auto.peer_id, roots) == leaf_fingerprint(
            cert.chain_path
        )
        # Renewal while the node keeps running: new handshakes get the new certificate.
        renewed = asyncio.Event()
        auto.on("renewed", lambda _c: renewed.set())
        planned = asyncio.Event()  # the Installed step scheduled the next renewal

        def on_transition(event: OrderEvent) -> None:
            if event.to_state == State.INSTALLED.value and event.trigger is None:
                planned.set()
            elif event.trigger is not None:
                planned.clear()

        auto.on("transition", on_transition)
        # Right after installing, our own worker still holds the order until it commits:
        # renew_now waits for that instead of failing.
        await auto.renew_now()
        async with asyncio.timeout(60):
            await renewed.wait()
        # Another worker holds the order for a moment: renew_now waits for its lease too.
        renewed.clear()
        async with asyncio.timeout(60):
            await planned.wait()  # our worker's Installed step committed: no lease of ours
        snap = await auto.order()
        await hold_lease(auto, snap.id, "other", datetime.now(UTC) + timedelta(hours=1))
        refused = asyncio.Event()
        force_renewal = operator.force_renewal

        async def watched_force_renewal(*args: Any, **kwargs: Any) -> Any:
            try:
                return await force_renewal(*args, **kwargs)
            except OrderBusyError:
                refused.set()
                raise

        monkeypatch.setattr(operator, "force_renewal", watched_force_renewal)
        renewing = asyncio.ensure_future(auto.renew_now())
        async with asyncio.timeout(60):
            await refused.wait()  # renew_now met the other worker's lease
        assert not renewing.done(), "renew_now waits for the lease instead of failing"
        await hold_lease(auto, snap.id, None, None)  # the other worker lets go
        await auto.refresh()  # as every store_poll: what another process did reaches us
        async with asyncio.timeout(60):
            await renewing
            await renewed.wait()
        new = auto.certificate
        assert new is not None and new.serial != cert.serial
        assert len(await auto.store.certificates()) == 3
        assert await served_fingerprint(node, auto.peer_id, roots) == leaf_fingerprint(
            new.chain_path
        )
    assert [name for name, _ in setup.events] == ["loaded", "renewed", "renewed"]


async def test_restart_restores_from_the_store_without_a_new_order(setup: Setup) -> None:
    first, node = setup.pair()
    async with node, first:
        async with asyncio.timeout(60):
            cert = await first.wait_for_certificate()
        order_id = first.order_id
    # The files are lost (a new disk, a cleaned data directory): the store still has them.
    cert.chain_path.unlink()
    cert.key_path.unlink()
    setup.events.clear()
    second, node2 = setup.pair()
    async with node2, second:
        assert second.order_id == order_id
        assert second.certificate is not None and second.certificate.serial == cert.serial
        assert cert.chain_path.exists() and cert.key_path.stat().st_mode & 0o777 == 0o600
        assert [name for name, _ in setup.events] == ["loaded"]
        roots = setup.pebble.issuer_roots_pem()
        assert await served_fingerprint(node2, second.peer_id, roots) == leaf_fingerprint(
            cert.chain_path
        )
        assert len(await second.store.certificates()) == 1


async def test_a_permanent_failure_is_reported_and_ends_the_wait(
    setup: Setup, pebble_factory: Any
) -> None:
    # A CA that requires External Account Binding, and none given: permanent.
    hmac_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    strict = pebble_factory(PebbleOptions(eab_keys={"kid-1": hmac_key}))
    auto, node = setup.pair(
        directory_url=strict.directory_url, ca_file=str(strict.ca_file), trust_roots=[]
    )
    async with node, auto:
        with pytest.raises(IssuanceFailed, match="externalAccountRequired"):
            async with asyncio.timeout(60):
                await auto.wait_for_certificate()
        snap = await auto.order()
        assert snap.state == State.FAILED.value
    assert [name for name, _ in setup.events] == ["failed"]
    assert auto.forge_addresses() == []


async def test_an_untrusted_chain_is_kept_and_installed_after_the_fix_without_a_new_order(
    setup: Setup,
) -> None:
    # Trusting the wrong roots (a private CA without --trust-roots): the issued certificate
    # is kept and the order waits in Finalized, naming the option that fixes it.
    held = asyncio.Event()
    auto, node = setup.pair(trust_roots=[_unrelated_root()])
    auto.on("transition", lambda e: held.set() if e.error_class == "configuration" else None)
    async with node, auto:
        async with asyncio.timeout(60):
            await held.wait()
        snap = await auto.order()
        assert (snap.state, snap.last_error_class) == (State.FINALIZED.value, "configuration")
        assert "--trust-roots" in (snap.last_error_message or "")
        stored = x509.load_pem_x509_certificates(snap.data["chain_pem"].encode())[0]
        # Waiting longer is of no use before the fix: the next attempt is a minute away.
        with pytest.raises(DeadlineExceeded, match=r"Finalized.*configuration"):
            await auto.wait_for_certificate(deadline=datetime.now(UTC) + timedelta(seconds=5))
        assert auto.certificate is None
    assert setup.events == []
    # Restarted with the right roots: the stored chain is installed at once, no new order.
    fixed, node2 = setup.pair()
    async with node2, fixed:
        async with asyncio.timeout(30):
            cert = await fixed.wait_for_certificate()
        assert cert.serial == f"{stored.serial_number:x}"
        triggers = [j.trigger for j in await fixed.store.journal(snap.id)]
        assert triggers.count("order_placed") == 1 and triggers.count("certificate_issued") == 1
        journal = await fixed.store.journal(snap.id)
        assert ("retry_later", "configuration") in [
            (j.trigger, j.detail.get("error_class")) for j in journal
        ]
        assert len(await fixed.store.certificates()) == 1
    assert [name for name, _ in setup.events] == ["loaded"]


async def test_renew_now_refuses_an_order_that_is_not_installed(setup: Setup) -> None:
    from autotls.persistence.errors import OrderStateError

    auto, node = setup.pair(run_worker=False)
    async with node, auto:
        with pytest.raises(OrderStateError, match="order 1 is New"):
            await auto.renew_now()


def _unrelated_root() -> x509.Certificate:
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Unrelated Root")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


async def test_autotls_faults_crashes_a_facade_and_the_restart_takes_its_lease_at_once(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """AUTOTLS_FAULTS reaches the worker of any process (here an embedding one). The process
    dies by SIGKILL holding the order's 60 s lease; the restarted one, on the same host,
    proves the owner dead (its pid is gone) and takes the lease over instead of waiting."""
    from autotls.peerid import save_private_key

    save_private_key(setup.key, setup.tmp / "identity.key")
    env = {**os.environ, "AUTOTLS_FAULTS": "before_effect@New:kill"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.facade_process",
        "--data-dir", str(setup.tmp / "data"),
        "--key", str(setup.tmp / "identity.key"),
        "--directory", setup.pebble.directory_url,
        "--ca-file", str(setup.pebble.ca_file),
        "--broker", setup.broker.url,
        "--dns", "{}:{}".format(*setup.pebble.dns_address),
        env=env,
        cwd=str(Path(__file__).parent.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, output.decode()
    auto, node = setup.pair()
    caplog.set_level(logging.WARNING, logger="autotls")
    async with node, auto:
        snap = await auto.order()
        assert snap.lease_owner is not None and snap.lease_owner.split(":")[1] == str(proc.pid)
        async with asyncio.timeout(60):
            await auto.wait_for_certificate()
    took = [r.getMessage() for r in caplog.records if "took over the lease" in r.getMessage()]
    assert took == [
        f"order {snap.id}: took over the lease of {snap.lease_owner}, whose process is gone"
    ]


async def test_a_process_without_the_lease_serves_what_the_other_installed(
    setup: Setup,
) -> None:
    """Two processes for one identity on one data directory: the one that does not hold the
    order's lease notices the installed certificate through the store, serves it, and its
    wait ends (what `run --once` needs to exit 0)."""
    first, node1 = setup.pair()
    second, node2 = setup.pair(store_poll=timedelta(milliseconds=50))
    async with node1, node2, first, second:
        async with asyncio.timeout(60):
            cert = await second.wait_for_certificate()
            mine = await first.wait_for_certificate()
        assert cert.serial == mine.serial
        roots = setup.pebble.issuer_roots_pem()
        for node, auto in ((node1, first), (node2, second)):
            assert await served_fingerprint(node, auto.peer_id, roots) == leaf_fingerprint(
                cert.chain_path
            )
        assert len(await second.store.certificates()) == 1


async def test_start_refuses_a_ca_that_is_not_acme_before_touching_any_order(
    setup: Setup,
) -> None:
    async def html(_request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/directory", html)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        auto = setup.autotls([], directory_url=f"http://127.0.0.1:{port}/directory")
        with pytest.raises(ConfigurationError, match="not an ACME directory") as info:
            await auto.start()
        assert "\n" not in str(info.value)
    finally:
        await runner.cleanup()
    from autotls.persistence.store import Store

    async with await Store.open(f"sqlite:///{setup.tmp / 'data' / 'autotls.db'}") as store:
        assert await store.list_orders() == [], "no order was created or touched"


async def test_start_refuses_a_data_directory_others_may_write(setup: Setup) -> None:
    data = setup.tmp / "data"
    data.mkdir(mode=0o700)
    data.chmod(0o777)
    auto = setup.autotls([])
    with pytest.raises(ConfigurationError, match=f"{data} is writable by others.*chmod go-w"):
        await auto.start()
    assert list(data.iterdir()) == [], "nothing was created in it"
    data.chmod(0o700)
    fresh = setup.tmp / "fresh" / "nested"
    async with setup.autotls([], data_dir=fresh, run_worker=False):
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
