"""The surface an embedder lives in (issue 9 §3): one package of public names, used by the
README and the examples; every error the facade raises is an AutoTLSError; node and facade
wire together without tricks; the facade's clock reaches every part; its waits wake on
changes, never on a sleep loop."""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

import autotls
from autotls import (
    AutoTLS,
    AutoTLSError,
    ErrorClass,
    Failure,
    IssuanceFailed,
    NotStartedError,
    OrderStateError,
    PrivateKey,
    State,
    Trigger,
)
from autotls.fsm.clock import ManualClock
from autotls.fsm.errors import PermanentError
from autotls.fsm.policy import plan_error

ROOT = Path(__file__).resolve().parent.parent


def _autotls_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autotls"):
            found.append((node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("autotls.")]
    return found


def test_examples_and_the_readme_use_only_public_names() -> None:
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "examples").glob("*.py")}
    readme = (ROOT / "README.md").read_text()
    for n, block in enumerate(re.findall(r"```python\n(.*?)```", readme, flags=re.S)):
        sources[f"README.md python block {n}"] = block
    assert len(sources) >= 2
    for where, source in sources.items():
        for module, names in _autotls_imports(ast.parse(source)):
            assert module == "autotls", f"{where} imports {module}"
            assert set(names) <= set(autotls.__all__), (where, set(names) - set(autotls.__all__))
    # The prose names no module inside the package either (`autotls.db` is the database file,
    # `autotls.ssl_context` the facade's attribute).
    assert re.findall(r"`autotls\.\w+\.\w", readme) == []


def test_every_exported_error_is_an_autotls_error_and_parse_errors_are_value_errors() -> None:
    errors = {
        name: value
        for name in autotls.__all__
        if isinstance(value := getattr(autotls, name), type) and issubclass(value, BaseException)
    }
    assert {"IssuanceFailed", "DeadlineExceeded", "OrderStateError", "OrderBusyError"} <= set(
        errors
    )
    for name, error in errors.items():
        assert issubclass(error, AutoTLSError), name
    for parse_error in ("PeerIdError", "MultiaddrError", "NameserverError", "DatabaseURLError"):
        assert issubclass(errors[parse_error], ValueError), parse_error
    assert not issubclass(autotls.OrderStateError, autotls.OrderBusyError)


def test_issuance_failed_carries_the_error_class_and_the_problem_document() -> None:
    problem = {"type": "urn:ietf:params:acme:error:unauthorized", "detail": "no", "status": 403}
    failed = IssuanceFailed(Failure(7, "permanent", "unauthorized: no", problem))
    assert isinstance(failed, AutoTLSError)
    assert failed.error_class is ErrorClass.PERMANENT and failed.problem == problem
    assert str(failed) == "order 7 failed (permanent): unauthorized: no"
    assert IssuanceFailed(Failure(7, None, "corrupt", None)).error_class is ErrorClass.PERMANENT


@dataclass
class _Bound:
    """Any object with listen addresses can be attached (a Libp2pNode is one)."""

    listen_addresses: list[str]


def _facade(tmp_path: Path, clock: ManualClock, **options: object) -> AutoTLS:
    return AutoTLS(
        PrivateKey.generate(),
        data_dir=tmp_path / "data",
        directory_url="https://127.0.0.1:9/directory",  # never contacted: no worker runs
        trust_roots=[],
        clock=clock,
        run_worker=False,
        check_directory=False,
        store_poll=timedelta(days=1),
        **options,  # type: ignore[arg-type]
    )


def test_addresses_come_from_an_attached_node_unless_given(tmp_path: Path) -> None:
    auto = _facade(tmp_path, ManualClock())
    assert auto.addresses() == []
    node = _Bound(["/ip4/127.0.0.1/tcp/4001"])
    auto.attach(node)
    assert auto.addresses() == ["/ip4/127.0.0.1/tcp/4001"]
    node.listen_addresses = ["/ip4/0.0.0.0/tcp/4001"]  # read at each call, binds expanded
    expanded = auto.addresses()
    assert expanded and "/ip4/0.0.0.0/tcp/4001" not in expanded
    assert "/ip4/127.0.0.1/tcp/4001" in expanded
    given = _facade(tmp_path, ManualClock(), addresses=["/ip4/203.0.113.7/tcp/4001"])
    given.attach(node)
    assert given.addresses() == ["/ip4/203.0.113.7/tcp/4001"]


def test_the_facade_clock_reaches_every_part(tmp_path: Path) -> None:
    clock = ManualClock()
    auto = _facade(tmp_path, clock)
    assert auto.installer.clock is clock and auto.acme.clock is clock and auto.dns.clock is clock
    assert auto.broker.clock is clock  # Retry-After dates of the broker's answers


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[tuple[AutoTLS, ManualClock]]:
    clock = ManualClock()
    auto = _facade(tmp_path, clock)
    with pytest.raises(NotStartedError):
        await auto.order()
    async with auto:
        yield auto, clock


async def test_a_failed_order_raises_issuance_failed_with_the_servers_problem(
    started: tuple[AutoTLS, ManualClock],
) -> None:
    auto, clock = started
    problem = {"type": "urn:ietf:params:acme:error:rejectedIdentifier", "detail": "not yours"}
    (claimed,) = await auto.store.claim_due("w", now=clock.now(), lease_seconds=60, limit=1)
    assert not isinstance(claimed, autotls.AutoTLSError)
    error = PermanentError("rejectedIdentifier: not yours", problem=problem)
    plan = plan_error(claimed, error, clock.now(), auto.settings, auto.worker.ports.rng)
    assert await auto.store.commit(claimed, plan, now=clock.now(), worker="w")
    with pytest.raises(IssuanceFailed) as raised:
        await auto.wait_for_certificate()
    assert raised.value.error_class is ErrorClass.PERMANENT
    assert raised.value.problem == problem
    assert raised.value.failure.problem == problem


async def test_renew_now_refuses_a_wrong_state_with_its_own_error(
    started: tuple[AutoTLS, ManualClock],
) -> None:
    auto, _clock = started
    with pytest.raises(OrderStateError, match="is New; this action needs one of Installed"):
        await auto.renew_now()


async def test_renew_now_waits_for_a_lease_to_end_on_the_facades_clock(
    started: tuple[AutoTLS, ManualClock],
) -> None:
    """Another process holds the Installed order: renew_now sleeps until its lease ends (on
    the injected clock), then renews: no polling, no wall-clock sleep."""
    auto, clock = started
    order_id = auto.order_id
    held_until = clock.now() + timedelta(seconds=45)
    async with auto.store.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE orders SET state = 'Installed', data = '{\"installed_at\": \"x\"}',"
                " lease_owner = 'other', lease_until = :until WHERE id = :id"
            ),
            {"until": held_until.replace(tzinfo=None), "id": order_id},
        )
    asleep = clock.sleepers  # the store watcher
    renewing = asyncio.ensure_future(auto.renew_now())
    async with asyncio.timeout(30):
        await clock.sleeping(asleep + 1)
    assert not renewing.done()
    clock.set(held_until)
    async with asyncio.timeout(30):
        await renewing
    snap = await auto.order()
    assert snap.state == State.RENEW_DUE.value
    journal = await auto.store.journal(snap.id)
    assert journal[-1].trigger == Trigger.FORCE_RENEWAL
    assert journal[-1].detail["reason"] == "forced"
