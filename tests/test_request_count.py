"""ACME requests per issuance on real Pebble (issue 11: <= 10 with a new account, <= 8 with a
known one), counted from the HTTP layer's observer as Pebble would log them: the directory
GET, the newNonce HEAD and every POST.

Pebble validates in the background, so how many times the order is polled before it is
``ready`` (or ``valid`` after finalize) depends on the machine. The test therefore asserts
the exchanges exactly, and of the polls only that each one was needed (every poll but the
last of a wait found the order not yet there): with the CA as fast as the first 25 ms
check, the count is the target itself."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509

from autotls import AutoTLS, PrivateKey
from autotls.http import Exchange
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleOptions, PebbleStack
from autotls.node import Libp2pNode
from tests.fixtures.pebble import PebbleFactory

pytestmark = pytest.mark.usefixtures("libp2p_installed")

LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]
# Every exchange but the order polls: (request class, count).
NEW_ACCOUNT = {
    "directory": 1,
    "newNonce": 1,
    "newAccount": 1,
    "newOrder": 1,
    "authz": 1,
    "challenge": 1,
    "finalize": 1,
    "certificate": 1,
}
KNOWN_ACCOUNT = {k: v for k, v in NEW_ACCOUNT.items() if k not in ("directory", "newAccount")}


async def issue(pebble: PebbleStack, broker: LocalBroker, data_dir: Path) -> list[Exchange]:
    key = PrivateKey.generate()
    roots = [
        c
        for pem in pebble.issuer_roots_pem()
        for c in x509.load_pem_x509_certificates(pem.encode())
    ]
    auto = AutoTLS(
        key,
        data_dir=data_dir,
        directory_url=pebble.directory_url,
        ca_file=str(pebble.ca_file),
        broker_url=broker.url,
        dns_servers=["{}:{}".format(*pebble.dns_address)],
        allow_private_addresses=True,
        trust_roots=roots,
    )  # the shipped settings
    seen: list[Exchange] = []
    auto.observe_http(
        lambda service, exchange: seen.append(exchange) if service == "acme" else None
    )
    async with Libp2pNode(key, listen=LISTEN, autotls=auto), auto:
        async with asyncio.timeout(60):
            await auto.wait_for_certificate()
    return seen


def check(seen: list[Exchange], expected: dict[str, int], target: int) -> None:
    assert all(e.status is not None and e.status < 300 for e in seen), [
        (e.request_class, e.status) for e in seen
    ]
    classes = Counter(e.request_class for e in seen)
    polls = [
        json.loads(e.response_body or b"{}")["status"] for e in seen if e.request_class == "order"
    ]
    del classes["order"]
    assert dict(classes) == expected
    # Two waits (validation, then issuance); each ends at its first ready / valid answer.
    assert polls.count("ready") == 1 and polls[-1] == "valid"
    ready = polls.index("ready")
    assert set(polls[:ready]) <= {"pending"}
    assert set(polls[ready + 1 : -1]) <= {"processing"}
    # The count without the polls that found the CA not there yet: the target's.
    assert len(seen) - (len(polls) - 2) <= target


async def test_requests_per_issuance_new_then_known_account(
    pebble_factory: PebbleFactory, tmp_path: Path
) -> None:
    pebble = pebble_factory(PebbleOptions())  # no nonce rejection: every request counts once
    async with LocalBroker(challtestsrv_url=pebble.challtestsrv_url) as broker:
        data_dir = tmp_path / "data"
        check(await issue(pebble, broker, data_dir), NEW_ACCOUNT, target=10)
        # The same data directory: its account, and its cached directory, are known.
        assert (data_dir / "acme-directory.json").exists()
        check(await issue(pebble, broker, data_dir), KNOWN_ACCOUNT, target=8)
