"""The local broker: production body rules, PeerID auth in front, dial-back, and the TXT record
served by a real pebble-challtestsrv (queried with dnspython) - first with a fake dialer, then
end to end with a real py-libp2p node dialed back for real."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest

from autotls.broker import (
    BrokerClient,
    BrokerDialError,
    BrokerRejected,
    BrokerUnavailable,
)
from autotls.http import HttpTransport
from autotls.localstack.broker import BodyError, LocalBroker, parse_registration
from autotls.peerid import KeyType, PeerId, PrivateKey
from autotls.peeridauth import (
    ClientHandshake,
    PeerIdAuthClient,
    b64decode,
    b64encode,
    format_header,
    parse_header,
    request_hostname,
)
from tests.fixtures.broker import ChallTestSrv, challtestsrv  # noqa: F401 - fixture
from tests.fixtures.components import component_missing

VALUE = "x" * 42 + "A"
OTHER_VALUE = "y" * 42 + "A"
ADDRS = ["/ip4/127.0.0.1/tcp/4001"]


# --- Body rules (pure) -------------------------------------------------------------------------


def test_body_rules_accept_production_bodies() -> None:
    assert parse_registration(json.dumps({"value": VALUE, "addresses": ADDRS}).encode()) == (
        VALUE,
        ADDRS,
    )
    # keys are matched case-insensitively, as Go's encoding/json does
    assert parse_registration(json.dumps({"VALUE": VALUE, "Addresses": ADDRS}).encode()) == (
        VALUE,
        ADDRS,
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"value": VALUE, "addresses": ADDRS, "extra": 1}, "unknown field 'extra'"),
        ({"value": VALUE + "=", "addresses": ADDRS}, "unpadded"),
        ({"value": "x" * 40, "addresses": ADDRS}, "32 bytes, got 30"),
        ({"value": "x" * 42 + "+", "addresses": ADDRS}, "not base64url"),
        ({"value": 5, "addresses": ADDRS}, "value must be a string"),
        ({"addresses": ADDRS}, "value must be a string"),
        ({"value": VALUE, "addresses": "/ip4/1.2.3.4/tcp/1"}, "list of strings"),
        ({"value": VALUE, "addresses": ["/ip4/999.1.1.1/tcp/1"]}, "invalid multiaddr"),
        ({"value": VALUE, "addresses": ["not-a-multiaddr"]}, "invalid multiaddr"),
        ([VALUE], "JSON object"),
    ],
)
def test_body_rules_refuse(body: Any, message: str) -> None:
    with pytest.raises(BodyError, match=message):
        parse_registration(json.dumps(body).encode())


def test_body_must_be_json() -> None:
    with pytest.raises(BodyError, match="invalid JSON"):
        parse_registration(b"value=x")


# --- Over HTTP, with challtestsrv --------------------------------------------------------------


class FakeDialer:
    def __init__(self) -> None:
        self.calls: list[tuple[PeerId, list[str]]] = []
        self.fail: str | None = None

    async def __call__(self, peer: PeerId, addresses: Sequence[str]) -> str:
        self.calls.append((peer, list(addresses)))
        if self.fail is not None:
            raise RuntimeError(self.fail)
        return addresses[0]


@pytest.fixture
async def local_broker(
    challtestsrv: ChallTestSrv,  # noqa: F811 - the imported fixture
) -> AsyncIterator[tuple[LocalBroker, FakeDialer]]:
    dialer = FakeDialer()
    async with LocalBroker(challtestsrv_url=challtestsrv.management_url, dialer=dialer) as broker:
        yield broker, dialer


async def test_registration_publishes_the_txt_record(
    local_broker: tuple[LocalBroker, FakeDialer],
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> None:
    broker, dialer = local_broker
    key = PrivateKey.generate()
    name = f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct."
    assert await challtestsrv.txt(name) == []
    async with BrokerClient(key, base_url=broker.url, allow_private_addresses=True) as client:
        assert (await client.health()).healthy
        assert await client.register(VALUE, ADDRS) == ADDRS
        assert dialer.calls == [(key.peer_id, ADDRS)]
        assert await challtestsrv.txt(name) == [VALUE]
        # one value per peer, last write wins (clear, then set: set-txt alone appends)
        await client.register(OTHER_VALUE, ADDRS)
        assert await challtestsrv.txt(name) == [OTHER_VALUE]
    assert broker.counters.accepted == 2 and broker.counters.refused == 0
    record = broker.records[key.peer_id.to_base36()]
    assert record.fqdn == name and record.value == OTHER_VALUE and record.dialed == ADDRS[0]


@pytest.mark.parametrize("key_type", [KeyType.RSA, KeyType.SECP256K1, KeyType.ECDSA])
async def test_registration_for_other_key_types(
    local_broker: tuple[LocalBroker, FakeDialer],
    challtestsrv: ChallTestSrv,  # noqa: F811
    key_type: KeyType,
) -> None:
    broker, _ = local_broker
    key = PrivateKey.generate(key_type)
    async with BrokerClient(key, base_url=broker.url, allow_private_addresses=True) as client:
        await client.register(VALUE, ADDRS)
    name = f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct."
    assert await challtestsrv.txt(name) == [VALUE]


async def test_failed_dial_back_is_a_400_and_sets_nothing(
    local_broker: tuple[LocalBroker, FakeDialer],
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> None:
    broker, dialer = local_broker
    dialer.fail = "no address answered"
    key = PrivateKey.generate()
    async with BrokerClient(key, base_url=broker.url, allow_private_addresses=True) as client:
        with pytest.raises(BrokerDialError, match="error testing addresses: no address answered"):
            await client.register(VALUE, ADDRS)
    assert await challtestsrv.txt(f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct.") == []
    assert broker.counters.refused_by_reason == {"dial": 1}


async def _raw_register(broker: LocalBroker, body: object) -> tuple[int, str]:
    """Register a body the BrokerClient would refuse to send, through the real auth flow."""
    async with HttpTransport(keep_ip_cookies=True) as http:
        resp = await PeerIdAuthClient(PrivateKey.generate(), http).request(
            "POST", broker.url + "/v1/_acme-challenge", json_body=body
        )
    assert resp.server_peer_id == broker.peer_id
    return resp.status, resp.body.decode()


async def test_body_rules_over_http(local_broker: tuple[LocalBroker, FakeDialer]) -> None:
    broker, dialer = local_broker
    assert await _raw_register(broker, {"value": VALUE + "=", "addresses": ADDRS}) == (
        400,
        "value must be unpadded base64url",
    )
    assert await _raw_register(broker, {"value": VALUE, "addresses": ADDRS, "x": 1}) == (
        400,
        "unknown field 'x'",
    )
    assert await _raw_register(broker, {"Value": VALUE, "ADDRESSES": ADDRS}) == (200, "")
    assert broker.counters.refused_by_reason == {"body": 2}
    assert len(dialer.calls) == 1


async def test_bad_signature_is_a_400(local_broker: tuple[LocalBroker, FakeDialer]) -> None:
    broker, dialer = local_broker
    url = broker.url + "/v1/_acme-challenge"
    hostname = request_hostname(url)
    hs = ClientHandshake(PrivateKey.generate(), hostname)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.post(url, headers={"Authorization": hs.start()}) as first:
            assert first.status == 401
            leg2 = hs.on_challenge(first.headers["WWW-Authenticate"])
        params = parse_header(leg2)
        assert params is not None
        sig = bytearray(b64decode(params["sig"]))
        sig[-1] ^= 0x55
        params["sig"] = b64encode(bytes(sig))
        async with session.post(
            url,
            headers={"Authorization": format_header(params)},
            json={"value": VALUE, "addresses": ADDRS},
        ) as second:
            assert second.status == 400
    assert dialer.calls == []
    assert broker.counters.refused_by_reason == {"auth": 1}


async def test_outage(local_broker: tuple[LocalBroker, FakeDialer]) -> None:
    broker, dialer = local_broker
    broker.set_outage(True, retry_after=7200)
    async with BrokerClient(
        PrivateKey.generate(), base_url=broker.url, allow_private_addresses=True
    ) as client:
        health = await client.health()
        assert not health.healthy and health.wait_s == 7200
        with pytest.raises(BrokerUnavailable) as info:
            await client.register(VALUE, ADDRS)
        assert info.value.retry_after == 7200
        broker.set_outage(False)
        assert (await client.health()).healthy
        await client.register(VALUE, ADDRS)
    assert len(dialer.calls) == 1


async def test_hostnames_are_enforced(challtestsrv: ChallTestSrv) -> None:  # noqa: F811
    async with (
        LocalBroker(
            challtestsrv_url=challtestsrv.management_url,
            dialer=FakeDialer(),
            hostnames={"registration.libp2p.direct"},
        ) as broker,
        BrokerClient(
            PrivateKey.generate(), base_url=broker.url, allow_private_addresses=True
        ) as client,
    ):
        with pytest.raises(BrokerRejected):
            await client.register(VALUE, ADDRS)


async def test_stopped_broker_refuses_connections(challtestsrv: ChallTestSrv) -> None:  # noqa: F811
    broker = LocalBroker(challtestsrv_url=challtestsrv.management_url, dialer=FakeDialer())
    url = await broker.start()
    assert broker.url == url
    await broker.stop()
    with pytest.raises(RuntimeError):
        _ = broker.url
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(url + "/v1/health")


async def test_challtestsrv_failure_is_a_500(challtestsrv: ChallTestSrv) -> None:  # noqa: F811
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    async with LocalBroker(challtestsrv_url=dead, dialer=FakeDialer()) as broker:
        async with BrokerClient(
            PrivateKey.generate(), base_url=broker.url, allow_private_addresses=True
        ) as client:
            with pytest.raises(BrokerUnavailable):
                await client.register(VALUE, ADDRS)
        assert broker.counters.refused_by_reason == {"dns": 1}


async def test_unauthenticated_first_leg_is_challenged(
    local_broker: tuple[LocalBroker, FakeDialer],
) -> None:
    broker, _ = local_broker
    async with (
        aiohttp.ClientSession() as session,
        session.post(broker.url + "/v1/_acme-challenge", json={}) as resp,
    ):
        assert resp.status == 401
        params = parse_header(resp.headers["WWW-Authenticate"])
    assert params is not None
    assert {"challenge-client", "public-key", "opaque"} <= set(params)


# --- End to end with a real py-libp2p node and a real dial-back ---------------------------------


def _require_node() -> Any:
    try:
        import libp2p  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        component_missing(f"py-libp2p ({exc})")
    try:
        from autotls import node
    except ImportError as exc:
        component_missing(f"autotls.node ({exc})")
    return node


@pytest.fixture
async def real_broker(
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> AsyncIterator[LocalBroker]:
    _require_node()
    async with LocalBroker(challtestsrv_url=challtestsrv.management_url, dial_timeout=10) as broker:
        yield broker


@pytest.mark.libp2p
@pytest.mark.slow
async def test_end_to_end_real_dial_back(
    real_broker: LocalBroker,
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> None:
    node_module = _require_node()
    key = PrivateKey.generate()
    async with node_module.Libp2pNode(key, listen=["/ip4/127.0.0.1/tcp/0"]) as node:
        addresses = list(node.listen_addresses)
        async with BrokerClient(
            key, base_url=real_broker.url, allow_private_addresses=True
        ) as client:
            sent = await client.register(VALUE, addresses)
    assert sent == addresses
    name = f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct."
    assert await challtestsrv.txt(name) == [VALUE]
    record = real_broker.records[key.peer_id.to_base36()]
    assert record.dialed == addresses[0]


@pytest.mark.libp2p
@pytest.mark.slow
async def test_end_to_end_nothing_listening(
    real_broker: LocalBroker,
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = f"/ip4/127.0.0.1/tcp/{sock.getsockname()[1]}"
    sock.close()
    key = PrivateKey.generate()
    async with BrokerClient(key, base_url=real_broker.url, allow_private_addresses=True) as client:
        with pytest.raises(BrokerDialError, match="error testing addresses"):
            await client.register(VALUE, [address])
    assert await challtestsrv.txt(f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct.") == []


@pytest.mark.libp2p
@pytest.mark.slow
async def test_end_to_end_another_peer_listening(
    real_broker: LocalBroker,
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> None:
    node_module = _require_node()
    impostor = PrivateKey.generate()
    key = PrivateKey.generate()
    async with (
        node_module.Libp2pNode(impostor, listen=["/ip4/127.0.0.1/tcp/0"]) as node,
        BrokerClient(key, base_url=real_broker.url, allow_private_addresses=True) as client,
    ):
        with pytest.raises(BrokerDialError, match="error testing addresses") as info:
            await client.register(VALUE, list(node.listen_addresses))
    assert "mismatch" in str(info.value) or str(impostor.peer_id) in str(info.value)
    assert await challtestsrv.txt(f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct.") == []


async def test_registration_is_concurrency_safe(
    local_broker: tuple[LocalBroker, FakeDialer],
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> None:
    broker, _ = local_broker
    keys = [PrivateKey.generate() for _ in range(4)]

    async def one(key: PrivateKey) -> None:
        async with BrokerClient(key, base_url=broker.url, allow_private_addresses=True) as c:
            await c.register(VALUE, ADDRS)

    await asyncio.gather(*(one(k) for k in keys))
    for key in keys:
        assert await challtestsrv.txt(
            f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct."
        ) == [VALUE]
    assert broker.counters.accepted == 4


async def test_401_mid_flow_restarts_the_handshake(
    local_broker: tuple[LocalBroker, FakeDialer],
    challtestsrv: ChallTestSrv,  # noqa: F811
) -> None:
    """The broker forgets its first challenge between the legs (a restarted or different
    backend: its opaque no longer verifies) and answers 401; the client starts over from that
    401's WWW-Authenticate and the registration still succeeds, once."""
    import os

    broker, dialer = local_broker
    sign_first_leg = broker.auth._sign_challenge
    refuse = broker.auth._challenge
    first_legs = 0
    refusals: list[str] = []

    def forgetful(*args: Any, **kwargs: Any) -> Any:
        nonlocal first_legs
        decision = sign_first_leg(*args, **kwargs)
        first_legs += 1
        if first_legs == 1:
            broker.auth._hmac_key = os.urandom(32)
        return decision

    def counted_refusal(hostname: str, reason: str) -> Any:
        refusals.append(reason)
        return refuse(hostname, reason)

    broker.auth._sign_challenge = forgetful  # type: ignore[method-assign]
    broker.auth._challenge = counted_refusal  # type: ignore[method-assign]
    key = PrivateKey.generate()
    async with BrokerClient(key, base_url=broker.url, allow_private_addresses=True) as client:
        assert await client.register(VALUE, ADDRS) == ADDRS
    assert any("HMAC invalid" in r for r in refusals), "the second leg was refused with a 401"
    assert len(dialer.calls) == 1
    name = f"_acme-challenge.{key.peer_id.to_base36()}.libp2p.direct."
    assert await challtestsrv.txt(name) == [VALUE]
