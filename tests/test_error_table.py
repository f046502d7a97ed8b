"""One error table: every ACME problem type gets the same class and the same engine decision
through the test fakes (tests/fakes/ports.py) as through production (the real ACME client and
adapter over HTTP, against the fake Boulder in tests/fakes/acme_server.py).

The expected classes are spelled out here, independently of autotls.acme.problems, so a change
to the table is a visible, reviewed change to this contract."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from autotls.acme.client import DEFAULT_BAD_NONCE_RETRIES
from autotls.adapters import AcmeAdapter
from autotls.fsm.clock import ManualClock
from autotls.fsm.errors import (
    AccountUnknownError,
    AutoTLSError,
    ErrorClass,
    ReplacesRefusedError,
)
from autotls.fsm.machine import State
from autotls.fsm.policy import plan_error
from autotls.fsm.ports import AcmeAccount, EngineSettings
from tests.fakes.acme_server import FakeAcmeServer
from tests.fakes.ports import FakeCA, acme_problem
from tests.fixtures.engine import claimed_snapshot

T, R, INV, P = (
    ErrorClass.TRANSIENT,
    ErrorClass.RATE_LIMITED,
    ErrorClass.ORDER_INVALID,
    ErrorClass.PERMANENT,
)
# RFC 8555 §6.7 (every type of the registry), with the HTTP status a CA sends it with.
RFC_8555: dict[str, tuple[int, ErrorClass]] = {
    "accountDoesNotExist": (400, P),
    "alreadyRevoked": (400, P),
    "badCSR": (400, P),
    "badNonce": (400, T),
    "badPublicKey": (400, P),
    "badRevocationReason": (400, P),
    "badSignatureAlgorithm": (400, P),
    "caa": (403, INV),
    "compound": (403, P),  # without subproblems: nothing says it is less than permanent
    "connection": (400, INV),
    "dns": (400, INV),
    "externalAccountRequired": (400, P),
    "incorrectResponse": (403, INV),
    "invalidContact": (400, P),
    "malformed": (400, P),
    "orderNotReady": (403, T),
    "rateLimited": (429, R),
    "rejectedIdentifier": (400, P),
    "serverInternal": (500, T),
    "tls": (400, INV),
    "unauthorized": (403, P),
    "unsupportedContact": (400, P),
    "unsupportedIdentifier": (400, P),
    "userActionRequired": (403, P),
}
# What Let's Encrypt (Boulder) adds or sends with other statuses, and the unknown.
LETS_ENCRYPT: dict[str, tuple[int, ErrorClass]] = {
    "alreadyReplaced": (409, INV),  # RFC 9773
    "invalidProfile": (400, P),  # draft-aaron-acme-profiles
    "malformed#404": (404, P),  # Boulder's "not found"
    "rateLimited#503": (503, R),  # a rateLimited type always rate-limits
    "serverInternal#503": (503, T),
    "somethingNew": (400, T),  # a type we do not know: a server novelty, not a reason to stop
    "somethingNew#500": (500, T),
}
TABLE = {**RFC_8555, **LETS_ENCRYPT}
IDENTIFIER = "*.k51qzi5uqu5dgy8qsq67hbz73jqkw87l3fgf4a91qb0d9b5173tir7n4vxk1oe.libp2p.direct"
CERT_ID = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def _kind(name: str) -> str:
    return name.split("#", 1)[0]


@pytest.fixture
async def boulder() -> AsyncIterator[FakeAcmeServer]:
    async with FakeAcmeServer() as server:
        yield server


async def _production(
    server: FakeAcmeServer,
    adapter: AcmeAdapter,
    account: AcmeAccount,
    name: str,
    replaces: str | None,
) -> AutoTLSError:
    status, _ = TABLE[name]
    # The client retries badNonce itself: only a CA that keeps refusing surfaces it.
    times = DEFAULT_BAD_NONCE_RETRIES + 1 if _kind(name) == "badNonce" else 1
    server.fail_next(
        "newOrder",
        status=status,
        problem_type=_kind(name),
        detail=f"{name} (injected)",
        times=times,
    )
    with pytest.raises(AutoTLSError) as info:
        await adapter.new_order(account, IDENTIFIER, profile=None, replaces=replaces)
    return info.value


async def _fake(name: str, replaces: str | None) -> AutoTLSError:
    ca = FakeCA(ManualClock())
    registered = await ca.register_account(AcmeAccount(ca.generate_account_key(), None))
    key = next(iter(ca.accounts))
    status, _ = TABLE[name]
    ca.fail("new_order", acme_problem(_kind(name), f"{name} (injected)", status))
    with pytest.raises(AutoTLSError) as info:
        await ca.new_order(
            AcmeAccount(key, registered.url), IDENTIFIER, profile=None, replaces=replaces
        )
    return info.value


def _decision(error: AutoTLSError) -> tuple[str, str | None]:
    """Where the engine sends an order in Registered on this error."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    snap = claimed_snapshot(State.REGISTERED, now, peer_id="peer", identifier=IDENTIFIER)
    plan = plan_error(snap, error, now, EngineSettings(), random.Random(1))
    return plan.to_state, plan.last_error_class


@pytest.mark.parametrize("replaces", [None, CERT_ID], ids=["new", "renewal"])
async def test_every_problem_type_is_classified_alike_by_fakes_and_production(
    boulder: FakeAcmeServer, replaces: str | None
) -> None:
    adapter = AcmeAdapter(boulder.directory_url)
    try:
        key = adapter.generate_account_key()
        registered = await adapter.register_account(AcmeAccount(key, None))
        account = AcmeAccount(key, registered.url)
        mismatches = []
        for name, (_status, expected) in TABLE.items():
            real = await _production(boulder, adapter, account, name, replaces)
            fake = await _fake(name, replaces)
            refused = (
                replaces is not None
                and expected in (P, INV)
                and not isinstance(real, AccountUnknownError)
            )
            want = (ReplacesRefusedError, INV) if refused else (None, expected)
            seen = {
                "production": (type(real), real.error_class, _decision(real)),
                "fake": (type(fake), fake.error_class, _decision(fake)),
            }
            if seen["production"] != seen["fake"]:
                mismatches.append((name, seen))
            if real.error_class is not want[1]:
                mismatches.append((name, f"class {real.error_class}, expected {want[1]}"))
            if want[0] is not None and not isinstance(real, want[0]):
                mismatches.append((name, f"{type(real).__name__}, expected {want[0].__name__}"))
        assert mismatches == []
    finally:
        await adapter.close()


async def test_the_typed_port_errors_drive_the_engine_not_the_strings(
    boulder: FakeAcmeServer,
) -> None:
    adapter = AcmeAdapter(boulder.directory_url)
    try:
        key = adapter.generate_account_key()
        registered = await adapter.register_account(AcmeAccount(key, None))
        account = AcmeAccount(key, registered.url)
        unknown = await _production(boulder, adapter, account, "accountDoesNotExist", None)
        assert isinstance(unknown, AccountUnknownError)
        assert _decision(unknown) == (State.NEW.value, "permanent")  # account_lost
        # Let's Encrypt's refusal of another account's certificate: 403 unauthorized. Without
        # `replaces` it stays a permanent failure; with it, the engine orders without it.
        unauthorized = await _production(boulder, adapter, account, "unauthorized", None)
        assert _decision(unauthorized) == (State.FAILED.value, "permanent")
        refused = await _production(boulder, adapter, account, "unauthorized", CERT_ID)
        assert isinstance(refused, ReplacesRefusedError)
        assert refused.problem is not None and refused.problem["type"].endswith(":unauthorized")
        # Never a refusal of `replaces` for trouble that is not about the request.
        for name in ("badNonce", "rateLimited", "serverInternal", "accountDoesNotExist"):
            error = await _production(boulder, adapter, account, name, CERT_ID)
            assert not isinstance(error, ReplacesRefusedError), name
    finally:
        await adapter.close()


def test_redirects_are_transient_from_the_ca_and_from_the_broker() -> None:
    from autotls.acme.problems import error_for_response
    from autotls.broker import BrokerProtocolError, classify_response

    acme = error_for_response(302, "text/html", b"<html>moved</html>", retry_after=None, url="u")
    broker = classify_response(302, b"", {"Location": "https://portal.example/"})
    assert isinstance(broker, BrokerProtocolError)
    assert acme.error_class is broker.error_class is ErrorClass.TRANSIENT
    assert "redirect" in str(acme) and "portal.example" in str(broker)
