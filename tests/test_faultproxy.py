"""The fault proxies themselves (tests/fixtures/faultproxy.py), against real Pebble, the local
broker and challtestsrv, seen from plain clients: every fault kind is observable on the wire,
the log records what the upstream did and what the client got, and the recovery after a
script's end is the upstream's own answer."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
import pytest

from autotls.acme import AcmeClient, generate_account_key
from autotls.acme.problems import AcmeNetworkError, AcmeProblem
from autotls.broker import BrokerClient, BrokerUnavailable
from autotls.dnscheck import txt_values
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleStack
from tests.fixtures.broker import ChallTestSrv, challtestsrv  # noqa: F401 - fixture
from tests.fixtures.faultproxy import (
    PLACEHOLDER_TTL,
    PLACEHOLDER_TXT,
    STALE_TXT,
    DnsFaultProxy,
    Fault,
    FaultKind,
    FaultLog,
    FaultProxy,
    FaultScript,
    broker_success,
    classify_acme,
    classify_broker,
)
from tests.fixtures.faultstack import upstream_ssl
from tests.fixtures.libp2p import RunningNode

pytestmark = pytest.mark.faultinjection

K = FaultKind
CLIENT_TIMEOUT = 0.5
VALUE = "x" * 42 + "A"


@dataclass
class Proxied:
    proxy: FaultProxy
    script: FaultScript
    log: FaultLog
    client_ssl: ssl.SSLContext | bool

    def plan(self, plan: Mapping[str, Sequence[Fault]]) -> None:
        self.script.load(plan)

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.client_ssl),
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
            trust_env=False,
        )


@pytest.fixture
async def acme_proxy(
    pebble: PebbleStack, proxy_server_ssl: ssl.SSLContext, proxy_ca_file: Path
) -> AsyncIterator[Proxied]:
    script, log = FaultScript(), FaultLog()
    proxy = FaultProxy(
        "acme",
        pebble.directory_url.removesuffix("/dir"),
        classify=classify_acme,
        script=script,
        log=log,
        server_ssl=proxy_server_ssl,
        upstream_ssl=upstream_ssl(pebble),
    )
    async with proxy:
        yield Proxied(proxy, script, log, ssl.create_default_context(cafile=str(proxy_ca_file)))


@pytest.fixture
async def broker_proxy(pebble: PebbleStack) -> AsyncIterator[tuple[Proxied, LocalBroker]]:
    script, log = FaultScript(), FaultLog()
    async with LocalBroker(challtestsrv_url=pebble.challtestsrv_url) as broker:
        proxy = FaultProxy(
            "broker",
            broker.url,
            classify=classify_broker,
            success=broker_success,
            script=script,
            log=log,
        )
        async with proxy:
            yield Proxied(proxy, script, log, False), broker


def acme_client(proxied: Proxied, proxy_ca_file: Path) -> AcmeClient:
    # A new account key per client; Pebble rejects none of these nonces (own fixture is 20 %,
    # the client retries badNonce itself).
    return AcmeClient(
        proxied.proxy.url + "/dir",
        generate_account_key(),
        ca_file=proxy_ca_file,
        timeout=CLIENT_TIMEOUT * 4,
    )


# -- ACME: Pebble behind the proxy ----------------------------------------------------------------


async def test_pebble_builds_its_urls_from_the_forwarded_host(
    acme_proxy: Proxied, proxy_ca_file: Path
) -> None:
    async with acme_proxy.session() as session, session.get(acme_proxy.proxy.url + "/dir") as resp:
        directory = await resp.json()
    urls = [v for v in directory.values() if isinstance(v, str)]
    assert urls and all(url.startswith(acme_proxy.proxy.url + "/") for url in urls)
    # Signed requests carry the proxy's URLs in their JWS; Pebble checks them against the
    # forwarded Host and accepts them.
    async with acme_client(acme_proxy, proxy_ca_file) as client:
        await client.new_account()
        order = await client.new_order(["example.test"])
        await client.get_authorization(order.authorizations[0])
    assert order.url.startswith(acme_proxy.proxy.url + "/my-order/")
    classes = [e.request_class for e in acme_proxy.log.exchanges]
    assert {"directory", "newNonce", "newAccount", "newOrder", "authz"} <= set(classes)
    assert acme_proxy.log.orders_created == 1
    assert acme_proxy.log.faults() == []


@pytest.mark.parametrize(
    ("kind", "status", "content_type", "text"),
    [
        (K.HTML_502, 502, "text/html", "502 Bad Gateway"),
        (K.HTML_503, 503, "text/html", "503 Service Unavailable"),
        (K.RETRY_AFTER_503, 503, "text/html", "503 Service Unavailable"),
        (K.JSON_500, 500, "application/json", '"internal error"'),
        (K.OK_INSTEAD_OF_CHALLENGE, 200, "text/html", "Please sign in"),
    ],
)
async def test_refusals_answer_for_the_upstream_and_then_recover(
    acme_proxy: Proxied, kind: FaultKind, status: int, content_type: str, text: str
) -> None:
    acme_proxy.plan({"directory": [Fault(kind, times=2, retry_after=42)]})
    async with acme_proxy.session() as session:
        for _ in range(2):
            async with session.get(acme_proxy.proxy.url + "/dir") as resp:
                assert resp.status == status
                assert resp.content_type == content_type
                assert text in await resp.text()
                assert resp.headers.get("Retry-After") == (
                    "42" if kind is K.RETRY_AFTER_503 else None
                )
        async with session.get(acme_proxy.proxy.url + "/dir") as resp:
            assert resp.status == 200
            assert "newOrder" in await resp.json()
    log = acme_proxy.log
    assert [(e.fault, e.upstream_status) for e in log.exchanges] == [
        (kind, None),
        (kind, None),
        (None, 200),
    ]
    assert acme_proxy.script.pending == {}


async def test_reset_drops_the_connection_before_the_upstream_sees_it(
    acme_proxy: Proxied,
) -> None:
    acme_proxy.plan({"newOrder": [Fault(K.RESET)]})
    async with acme_proxy.session() as session:
        # POST: aiohttp resends only idempotent requests after a dropped connection.
        with pytest.raises(aiohttp.ClientOSError, match="reset"):
            async with session.post(acme_proxy.proxy.url + "/order-plz", data=b"{}"):
                pass
    assert [(e.answered, e.upstream_status) for e in acme_proxy.log.exchanges] == [("reset", None)]
    assert acme_proxy.log.orders_created == 0


async def test_a_lost_answer_is_a_reset_after_the_upstream_answered(acme_proxy: Proxied) -> None:
    # Twice: aiohttp resends a GET once when its connection drops before the answer.
    acme_proxy.plan({"directory": [Fault(K.LOST_RESPONSE, times=2)]})
    async with acme_proxy.session() as session:
        with pytest.raises(aiohttp.ClientOSError, match="reset"):
            async with session.get(acme_proxy.proxy.url + "/dir"):
                pass
    assert [(e.answered, e.upstream_status) for e in acme_proxy.log.exchanges] == [
        ("reset", 200),
        ("reset", 200),
    ]


async def test_a_hang_lasts_until_the_client_gives_up(acme_proxy: Proxied) -> None:
    acme_proxy.plan({"directory": [Fault(K.HANG)]})
    async with acme_proxy.session() as session:
        with pytest.raises(TimeoutError):
            async with session.get(acme_proxy.proxy.url + "/dir"):
                pass
        async with session.get(acme_proxy.proxy.url + "/dir") as resp:
            assert resp.status == 200
    assert [(e.answered, e.upstream_status) for e in acme_proxy.log.exchanges] == [
        ("hang", None),
        ("200", 200),
    ]


async def test_a_truncated_answer_cannot_be_completed(acme_proxy: Proxied) -> None:
    acme_proxy.plan({"directory": [Fault(K.TRUNCATED)]})
    async with acme_proxy.session() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(acme_proxy.proxy.url + "/dir") as resp:
                assert resp.status == 200  # the headers arrive whole
                await resp.read()
    assert [(e.answered, e.upstream_status) for e in acme_proxy.log.exchanges] == [
        ("truncated 200", 200)
    ]


async def test_a_slow_loris_answer_outlasts_the_client(acme_proxy: Proxied) -> None:
    acme_proxy.plan({"directory": [Fault(K.SLOW_LORIS)]})
    async with acme_proxy.session() as session:
        with pytest.raises(TimeoutError):
            async with session.get(acme_proxy.proxy.url + "/dir") as resp:
                await resp.read()
    assert [(e.answered, e.upstream_status) for e in acme_proxy.log.exchanges] == [
        ("slow 200", 200)
    ]


async def test_a_lost_answer_leaves_the_order_made_at_the_ca(
    acme_proxy: Proxied, proxy_ca_file: Path
) -> None:
    acme_proxy.plan({"newOrder": [Fault(K.LOST_RESPONSE)]})
    async with acme_client(acme_proxy, proxy_ca_file) as client:
        await client.new_account()
        with pytest.raises(AcmeNetworkError):
            await client.new_order(["example.test"])
        await client.new_order(["example.test"])
    lost = acme_proxy.log.faults()
    assert [(e.request_class, e.upstream_status, e.answered) for e in lost] == [
        ("newOrder", 201, "reset")
    ]
    assert acme_proxy.log.orders_created == 2  # the CA made one the client never heard of


async def test_an_answer_fault_waits_for_an_answer_that_did_something(
    acme_proxy: Proxied, proxy_ca_file: Path
) -> None:
    acme_proxy.plan({"newOrder": [Fault(K.TRUNCATED)]})
    async with acme_client(acme_proxy, proxy_ca_file) as client:
        await client.new_account()
        # Pebble refuses this identifier: the refusal passes untouched, the fault stays due.
        with pytest.raises(AcmeProblem) as refused:
            await client.new_order(["127.0.0.1"])
        assert refused.value.status == 400
        assert acme_proxy.script.pending == {"newOrder": 1}
        with pytest.raises(AcmeNetworkError):
            await client.new_order(["example.test"])
    assert acme_proxy.script.pending == {}
    assert [(e.upstream_status, e.answered) for e in acme_proxy.log.faults()] == [
        (201, "truncated 201")
    ]


async def test_after_aims_at_a_later_request_of_the_class(acme_proxy: Proxied) -> None:
    acme_proxy.plan({"directory": [Fault(K.HTML_502, after=2)]})
    async with acme_proxy.session() as session:
        statuses = []
        for _ in range(4):
            async with session.get(acme_proxy.proxy.url + "/dir") as resp:
                statuses.append(resp.status)
    assert statuses == [200, 200, 502, 200]


# -- the broker behind the proxy ----------------------------------------------------------------


async def test_peerid_auth_through_the_proxy_signs_the_proxys_host(
    broker_proxy: tuple[Proxied, LocalBroker], libp2p_node: RunningNode
) -> None:
    proxied, broker = broker_proxy
    async with BrokerClient(
        libp2p_node.key, base_url=proxied.proxy.url, allow_private_addresses=True, timeout=5
    ) as client:
        assert (await client.health()).healthy
        await client.register(VALUE, [libp2p_node.tcp_address])
    assert [(e.request_class, e.upstream_status) for e in proxied.log.exchanges] == [
        ("health", 204),
        ("challenge_leg", 401),
        ("registration_leg", 200),
    ]
    assert broker.counters.accepted == 1


async def test_the_challenge_leg_can_get_a_200_page_instead_of_the_401(
    broker_proxy: tuple[Proxied, LocalBroker],
) -> None:
    proxied, _ = broker_proxy
    proxied.plan({"challenge_leg": [Fault(K.OK_INSTEAD_OF_CHALLENGE)]})
    auth = {"Authorization": 'libp2p-PeerID challenge-server="x", public-key="y"'}
    url = proxied.proxy.url + "/v1/_acme-challenge"
    async with proxied.session() as session:
        async with session.post(url, headers=auth) as resp:
            assert resp.status == 200
            assert "WWW-Authenticate" not in resp.headers
            assert "sign in" in await resp.text()
        async with session.post(url) as resp:  # recovery: the broker's own challenge
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("libp2p-PeerID ")
    assert [(e.fault, e.upstream_status) for e in proxied.log.exchanges] == [
        (K.OK_INSTEAD_OF_CHALLENGE, None),
        (None, 401),
    ]


async def test_a_registration_lost_after_the_broker_stored_it(
    broker_proxy: tuple[Proxied, LocalBroker],
    libp2p_node: RunningNode,
    challtestsrv: ChallTestSrv,  # noqa: F811 - fixture
) -> None:
    proxied, broker = broker_proxy
    proxied.plan({"registration_leg": [Fault(K.TRUNCATED)], "health": [Fault(K.HTML_502)]})
    async with BrokerClient(
        libp2p_node.key, base_url=proxied.proxy.url, allow_private_addresses=True, timeout=5
    ) as client:
        health = await client.health()
        assert not health.healthy and "502" in health.detail
        with pytest.raises(Exception, match="registration failed"):
            await client.register(VALUE, [libp2p_node.tcp_address])
    # The broker dialed back and published the value; only its answer was cut.
    assert broker.counters.accepted == 1
    name = f"_acme-challenge.{libp2p_node.peer_b36}.libp2p.direct."
    assert await challtestsrv.txt(name) == [VALUE]
    assert [(e.request_class, e.answered) for e in proxied.log.faults()] == [
        ("health", "502 html"),
        ("registration_leg", "truncated 200"),
    ]


async def test_a_broker_503_with_retry_after_reaches_the_client(
    broker_proxy: tuple[Proxied, LocalBroker], libp2p_node: RunningNode
) -> None:
    proxied, _ = broker_proxy
    proxied.plan({"registration_leg": [Fault(K.RETRY_AFTER_503, retry_after=90)]})
    async with BrokerClient(
        libp2p_node.key, base_url=proxied.proxy.url, allow_private_addresses=True, timeout=5
    ) as client:
        with pytest.raises(BrokerUnavailable) as refused:
            await client.register(VALUE, [libp2p_node.tcp_address])
    assert refused.value.status == 503
    assert refused.value.retry_after == pytest.approx(90, abs=1)


# -- DNS: challtestsrv behind the proxy ---------------------------------------------------------


@dataclass
class DnsProxied:
    proxy: DnsFaultProxy
    script: FaultScript
    log: FaultLog


@pytest.fixture
async def dns_proxy(pebble: PebbleStack) -> AsyncIterator[DnsProxied]:
    script, log = FaultScript(), FaultLog()
    proxy = DnsFaultProxy(pebble.dns_address, pebble.challtestsrv_url, script=script, log=log)
    async with proxy:
        yield DnsProxied(proxy, script, log)


async def _ask(proxy: DnsFaultProxy, name: str) -> dns.message.Message:
    assert proxy.address is not None
    query = dns.message.make_query(name, dns.rdatatype.TXT)
    return await dns.asyncquery.udp(query, proxy.address[0], port=proxy.address[1], timeout=0.5)


async def test_dns_faults_then_challtestsrvs_own_answer(
    dns_proxy: DnsProxied,
    pebble: PebbleStack,
    challtestsrv: ChallTestSrv,  # noqa: F811 - fixture
) -> None:
    proxy = dns_proxy.proxy
    name = "_acme-challenge.faults.libp2p.direct."
    await pebble.clear_txt(name)
    await pebble.set_txt(name, VALUE)
    dns_proxy.script.load(
        {
            "txt": [
                Fault(K.PLACEHOLDER),
                Fault(K.WRONG_VALUE),
                Fault(K.NO_ANSWER),
                Fault(K.OVERWRITTEN),
            ]
        }
    )
    placeholder = await _ask(proxy, name)
    # As the production broker answers before a value is set: authoritative, TTL 10 s.
    assert txt_values(placeholder, name) == [PLACEHOLDER_TXT]
    assert placeholder.answer[0].ttl == PLACEHOLDER_TTL
    assert placeholder.flags & dns.flags.AA
    assert txt_values(await _ask(proxy, name), name) == [STALE_TXT]
    with pytest.raises(dns.exception.Timeout):
        await _ask(proxy, name)
    # Overwritten: challtestsrv itself now serves another writer's value (so would Pebble).
    assert txt_values(await _ask(proxy, name), name) == [STALE_TXT]
    assert await challtestsrv.txt(name) == [STALE_TXT]
    await pebble.clear_txt(name)
    await pebble.set_txt(name, VALUE)
    assert txt_values(await _ask(proxy, name), name) == [VALUE]
    assert [e.fault for e in dns_proxy.log.exchanges] == [
        K.PLACEHOLDER,
        K.WRONG_VALUE,
        K.NO_ANSWER,
        K.OVERWRITTEN,
        None,
    ]
    assert dns_proxy.script.pending == {}
    # Other names and types pass through, untouched by the TXT script.
    dns_proxy.script.load({"txt": [Fault(K.NO_ANSWER)]})
    other = await _ask(proxy, "faults.libp2p.direct.")
    assert other.rcode() == 0
    assert dns_proxy.script.pending == {"txt": 1}


def test_every_fault_kind_is_exercised_by_these_tests() -> None:
    source = Path(__file__).read_text()
    missing = [k.name for k in FaultKind if f"K.{k.name}" not in source]
    assert missing == []
    assert json.dumps(sorted(k.value for k in FaultKind))  # plain strings, for the table
