"""Register only when dialable (issue 10 §2): no ACME order -- no authorization clock -- while
the broker could not dial the node back, nor during the registration delay, nor while the
broker is down.

* On the engine with fakes (fast, every branch): a hold is journaled once as
  ``registration_held`` and waits as data (``waiting_for``, ``next_run_at``); the order is
  placed as soon as an address turns up, without a restart; the registration delay counts
  from when the node came up, on the injected clock; a change of cause is journaled again;
  the broker's health is checked before the order (and again in Challenged).
* On real parts (Pebble, the local broker with its real libp2p dial-back, real py-libp2p
  nodes): a node with only loopback addresses and no ``allow_private_addresses`` sends no
  newOrder (the ACME adapter's own request log says so) and ``autotls status`` says why; a
  node whose addresses appear later is issued without a restart; the facade holds for its
  ``registration_delay`` on its injected clock; ``autotls run`` takes the delay from
  ``--registration-delay`` / ``AUTOTLS_REGISTRATION_DELAY``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from autotls import AutoTLS, PrivateKey, cli
from autotls.adapters import AcmeAdapter, BrokerAdapter
from autotls.cli.exits import UsageError
from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.data import RegistrationHold
from autotls.fsm.machine import State
from autotls.fsm.worker import run_until_idle
from autotls.http import Exchange
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleStack, pebble_available
from autotls.localstack.stack import LocalStack
from autotls.node import Libp2pNode
from autotls.persistence.records import OrderSnapshot
from tests.fixtures.components import component_missing
from tests.fixtures.engine import Engine
from tests.fixtures.realstack import RealStack

PUBLIC = ("/ip4/203.0.113.7/tcp/4001",)
LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]


async def triggers(store: object, order_id: int) -> list[str]:
    return [j.trigger for j in await store.journal(order_id)]  # type: ignore[attr-defined]


async def drive_until(engine: Engine, order_id: int, moment: datetime) -> OrderSnapshot:
    """Run the worker, jumping the clock from due time to due time, until ``moment``."""

    async def reached() -> bool:
        return engine.clock.now() >= moment

    await engine.drive(until=reached)
    return await engine.store.get_order(order_id)


# -- the engine, on fakes ------------------------------------------------------------------


async def test_no_order_while_the_broker_could_dial_nothing_then_one_without_restart(
    engine: Engine,
) -> None:
    engine.broker.addresses = ()
    start = engine.clock.now()
    order = await engine.order()
    snap = await drive_until(engine, order.id, start + timedelta(minutes=30))

    # Thirty rechecks, one journal entry, no request to the CA or the broker.
    assert snap.state == State.REGISTERED.value
    assert engine.ca.count("new_order") == 0
    assert engine.broker.health_checks == 0
    assert await triggers(engine.store, order.id) == [
        "create",
        "account_ready",
        "registration_held",
    ]
    [held] = [j for j in await engine.store.journal(order.id) if j.trigger == "registration_held"]
    assert held.detail["because"] == RegistrationHold.NOT_DIALABLE
    assert snap.data["held_because"] == RegistrationHold.NOT_DIALABLE
    assert str(snap.data["waiting_for"]).startswith("an address the broker could dial")
    assert snap.last_error_class is None  # a condition of the node, not an error
    assert snap.next_run_at <= engine.clock.now() + engine.ports.settings.dialable_recheck

    # An address turns up (the node learned its public one): the order is placed at the next
    # look, by the same worker.
    engine.broker.addresses = PUBLIC
    appeared = engine.clock.now()
    await engine.drive()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.INSTALLED.value
    assert engine.ca.count("new_order") == 1
    journal = await engine.store.journal(order.id)
    placed = next(j for j in journal if j.trigger == "order_placed")
    assert placed.at <= appeared + engine.ports.settings.dialable_recheck
    assert [j.trigger for j in journal].count("registration_held") == 1
    assert "held_because" not in snap.data and "waiting_for" not in snap.data


async def test_the_registration_delay_counts_from_when_the_node_came_up(engine: Engine) -> None:
    delay = timedelta(minutes=45)
    engine.ports.settings = replace(engine.ports.settings, registration_delay=delay)
    came_up = engine.clock.now()
    engine.broker.online_since = came_up
    engine.clock.advance(minutes=10)  # the order is made a while after the node started
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)

    journal = await engine.store.journal(order.id)
    [held] = [j for j in journal if j.trigger == "registration_held"]
    assert held.detail["because"] == RegistrationHold.REGISTRATION_DELAY
    assert held.detail["until"] == (came_up + delay).isoformat()
    placed = next(j for j in journal if j.trigger == "order_placed")
    assert placed.at == came_up + delay  # not a moment earlier, nor later
    assert engine.ca.count("new_order") == 1

    # A delay that is over (a node up long ago) holds nothing.
    second = await engine.order()
    await engine.drive_to(second.id, State.INSTALLED)
    assert "registration_held" not in await triggers(engine.store, second.id)


async def test_the_delay_waits_as_data_and_a_restarted_worker_keeps_it(engine: Engine) -> None:
    delay = timedelta(hours=1)
    engine.ports.settings = replace(engine.ports.settings, registration_delay=delay)
    engine.broker.online_since = engine.clock.now()
    order = await engine.order()
    await run_until_idle(engine.worker())  # due now only: the clock does not move
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.REGISTERED.value
    assert snap.next_run_at == engine.broker.online_since + delay
    assert "registration delay" in str(snap.data["waiting_for"])
    # Another worker (a restart) finds nothing due before then, and orders at that moment.
    assert await engine.worker(name="restarted").run_once() == 0
    await engine.drive_to(order.id, State.CHALLENGED)
    assert engine.clock.now() == engine.broker.online_since + delay


async def test_a_change_of_cause_is_journaled_again(engine: Engine) -> None:
    engine.ports.settings = replace(engine.ports.settings, registration_delay=timedelta(hours=2))
    engine.broker.online_since = engine.clock.now()
    engine.broker.addresses = ()
    order = await engine.order()
    await drive_until(engine, order.id, engine.clock.now() + timedelta(minutes=5))
    engine.broker.addresses = PUBLIC  # dialable now, but the node has been up 5 minutes only
    await engine.drive_to(order.id, State.INSTALLED)
    journal = await engine.store.journal(order.id)
    holds = [j.detail["because"] for j in journal if j.trigger == "registration_held"]
    assert holds == [RegistrationHold.NOT_DIALABLE, RegistrationHold.REGISTRATION_DELAY]
    assert engine.ca.count("new_order") == 1


async def test_the_broker_health_is_checked_before_the_order(engine: Engine) -> None:
    engine.broker.healthy = False
    order = await engine.order()
    start = engine.clock.now()
    snap = await drive_until(engine, order.id, start + timedelta(hours=2, minutes=30))
    assert snap.state == State.REGISTERED.value
    assert engine.ca.count("new_order") == 0
    waits = [j for j in await engine.store.journal(order.id) if j.trigger == "retry_later"]
    assert [(j.from_state, j.detail["error_class"], j.detail["retry_after"]) for j in waits] == [
        (State.REGISTERED.value, "rate_limited", engine.broker.wait_s)
    ] * 3
    checks = engine.broker.health_checks
    engine.broker.heal()
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == 1
    # Once before the order, and once more in Challenged, before registering.
    assert engine.broker.health_checks == checks + 2


async def test_a_renewal_is_held_too_and_the_certificate_kept(engine: Engine) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    installed = (await engine.store.get_order(order.id)).certificate
    engine.broker.addresses = ()
    await operator.force_renewal(engine.store, order.id, now=engine.clock.now(), actor="test")
    snap = await drive_until(engine, order.id, engine.clock.now() + timedelta(minutes=10))
    assert snap.state == State.REGISTERED.value
    assert snap.data["held_because"] == RegistrationHold.NOT_DIALABLE
    assert engine.ca.count("new_order") == 1, "no second order while nothing is dialable"
    assert snap.certificate == installed  # still the one served


# -- real parts ---------------------------------------------------------------------------


class AcmeLog:
    """The ACME adapter's own request log (every exchange it made, by request class; and
    the orders the CA created -- the session Pebble refuses a fifth of the nonces, and the
    client sends a refused newOrder again)."""

    def __init__(self) -> None:
        self.classes: list[str] = []
        self.orders_created = 0

    def __call__(self, exchange: Exchange) -> None:
        self.classes.append(exchange.request_class)
        if exchange.request_class == "newOrder" and exchange.status == 201:
            self.orders_created += 1


def real_ports(stack: RealStack, *, allow_private: bool, addresses: object, log: AcmeLog) -> object:
    """RealStack's adapters, with an ACME adapter that logs its requests and a broker adapter
    judging the node's addresses with or without ``allow_private_addresses``."""
    ports = stack.ports()
    old_acme, old_broker = ports.acme, ports.broker
    ports.acme = AcmeAdapter(
        stack.pebble.directory_url, ca_file=str(stack.pebble.ca_file), observer=log
    )
    ports.broker = BrokerAdapter(
        identity=stack.keys.get,
        addresses=addresses,  # type: ignore[arg-type]
        base_url=stack.broker.url,
        allow_private_addresses=allow_private,
    )
    stack.open_ports.append(replace(ports, acme=old_acme, broker=old_broker))
    return ports


async def test_a_loopback_node_without_allow_private_places_no_order_and_says_why(
    real_stack: RealStack, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    peer = await real_stack.peer()  # a real py-libp2p node on 127.0.0.1 only
    node = real_stack.nodes[peer]
    log = AcmeLog()
    ports = real_ports(
        real_stack,
        allow_private=False,
        addresses=lambda p: real_stack.nodes[p].listen_addresses,
        log=log,
    )
    order = await real_stack.order(peer)
    worker = real_stack.worker(ports)  # type: ignore[arg-type]
    until = real_stack.clock.now() + timedelta(hours=1)

    async def an_hour_later() -> bool:
        return real_stack.clock.now() >= until

    with caplog.at_level("WARNING", logger="autotls.worker"):
        await run_until_idle(
            worker, advance_clock=real_stack.clock.set, stop_when=an_hour_later, max_rounds=500
        )
    snap = await real_stack.store.get_order(order.id)
    assert snap.state == State.REGISTERED.value
    assert "newAccount" in log.classes  # the log sees what the adapter sends...
    assert "newOrder" not in log.classes  # ...and no order was placed in an hour of checks
    assert await triggers(real_stack.store, order.id) == [
        "create",
        "account_ready",
        "registration_held",
    ]
    tcp = node.listen_addresses[0]
    why = str(snap.data["waiting_for"])
    assert why.startswith("an address the broker could dial: ") and tcp in why
    assert "is public" in why

    # The operator sees why, in the log once and in `autotls status` for as long as it lasts.
    [line] = [r.getMessage() for r in caplog.records if "registration_held" in r.getMessage()]
    assert why in line
    code = await asyncio.to_thread(
        cli.main, ["status", "--db", f"sqlite:///{real_stack.workdir / 'real.db'}"]
    )
    table = capsys.readouterr().out
    assert code == 0
    assert "Registered" in table and "waiting for an address the broker could dial" in table
    code = await asyncio.to_thread(
        cli.main, ["status", "--json", "--db", f"sqlite:///{real_stack.workdir / 'real.db'}"]
    )
    [row] = json.loads(capsys.readouterr().out)
    assert row["waiting_for"] == why and row["last_error_class"] is None


async def test_addresses_that_appear_later_get_the_order_placed_without_restart(
    real_stack: RealStack,
) -> None:
    peer = await real_stack.peer()
    announced: list[str] = []  # what the embedding application offers, empty at first
    log = AcmeLog()
    ports = real_ports(real_stack, allow_private=True, addresses=lambda _p: announced, log=log)
    order = await real_stack.order(peer)
    worker = real_stack.worker(ports)  # type: ignore[arg-type]
    await run_until_idle(worker)  # what is due now: New, then the hold
    snap = await real_stack.store.get_order(order.id)
    assert snap.state == State.REGISTERED.value
    assert "no addresses" in str(snap.data["waiting_for"])
    assert "newOrder" not in log.classes

    announced.extend(real_stack.nodes[peer].listen_addresses)
    snap = await real_stack.drive(worker, order.id, [State.INSTALLED, State.FAILED])
    assert snap.state == State.INSTALLED.value, snap.last_error_message
    assert log.orders_created == 1
    # The broker dialed the node back at the address that appeared.
    [sent] = [
        j.detail["addresses"]
        for j in await real_stack.store.journal(order.id)
        if j.trigger == "broker_accepted"
    ]
    assert sent == announced


async def test_the_facade_holds_for_its_registration_delay_on_its_clock(
    pebble: PebbleStack, pebble_broker: LocalBroker, tmp_path: Path, libp2p_installed: None
) -> None:
    # The clock starts at real time (Pebble's expiries are real) and only jumps forward.
    clock = ManualClock(datetime.now(UTC) - timedelta(seconds=1))
    delay = timedelta(minutes=20)
    roots = [
        cert
        for pem in pebble.issuer_roots_pem()
        for cert in x509.load_pem_x509_certificates(pem.encode())
    ]
    key = PrivateKey.generate()
    auto = AutoTLS(
        key,
        data_dir=tmp_path / "data",
        directory_url=pebble.directory_url,
        ca_file=str(pebble.ca_file),
        broker_url=pebble_broker.url,
        dns_servers=["{}:{}".format(*pebble.dns_address)],
        allow_private_addresses=True,
        trust_roots=roots,
        registration_delay=delay,
        clock=clock,
        run_worker=False,
        store_poll=timedelta(days=1),
    )
    orders_at: list[datetime] = []

    def note_orders(service: str, exchange: Exchange) -> None:
        # Created ones only: the session Pebble refuses a fifth of the nonces (badNonce), and
        # the client then sends the same newOrder again at once.
        if exchange.request_class == "newOrder" and exchange.status == 201:
            orders_at.append(clock.now())

    auto.observe_http(note_orders)
    async with Libp2pNode(key, listen=LISTEN, autotls=auto), auto:
        started = clock.now()
        await run_until_idle(auto.worker)  # what is due now, without moving the clock
        snap = await auto.order()
        assert snap.state == State.REGISTERED.value and orders_at == []
        assert snap.next_run_at == started + delay
        assert "registration delay" in str(snap.data["waiting_for"])

        async def installed() -> bool:
            return (await auto.order()).state == State.INSTALLED.value

        await run_until_idle(
            auto.worker, advance_clock=clock.set, stop_when=installed, max_rounds=500
        )
    assert orders_at == [started + delay]


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(cli.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    yield


def _settings(*argv: str) -> cli.NodeSettings:
    args = cli.build_parser().parse_args(["run", *argv])
    cli.apply_environment(args)
    return cli.node_settings(args)


@pytest.mark.usefixtures("clean_environment")
def test_registration_delay_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _settings().registration_delay == timedelta(0)
    assert _settings("--registration-delay", "1h30m").registration_delay == timedelta(minutes=90)
    assert _settings("--registration-delay", "0").registration_delay == timedelta(0)
    assert _settings("--registration-delay", "90").registration_delay == timedelta(seconds=90)
    monkeypatch.setenv("AUTOTLS_REGISTRATION_DELAY", "10m")
    assert _settings().registration_delay == timedelta(minutes=10)
    assert _settings("--registration-delay", "2h").registration_delay == timedelta(hours=2)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("flag", "env", "fragment"),
    [
        ("soon", None, "--registration-delay: 'soon' is not a duration"),
        ("-5m", None, "--registration-delay: '-5m' is not a duration"),
        ("-5", None, "--registration-delay: '-5': a duration must not be negative"),
        (None, "1 hour", "AUTOTLS_REGISTRATION_DELAY: '1 hour' is not a duration"),
    ],
)
def test_a_bad_registration_delay_names_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, flag: str | None, env: str | None, fragment: str
) -> None:
    if env is not None:
        monkeypatch.setenv("AUTOTLS_REGISTRATION_DELAY", env)
    argv = [f"--registration-delay={flag}"] if flag is not None else []
    with pytest.raises(UsageError) as raised:
        _settings(*argv)
    assert str(raised.value).startswith(fragment), str(raised.value)


@pytest.fixture
async def stack(tmp_path: Path, libp2p_installed: None) -> AsyncIterator[LocalStack]:
    if not pebble_available():
        component_missing("pebble (the pebble and pebble-challtestsrv binaries)")
    async with LocalStack(tmp_path / "stack") as running:
        yield running


@pytest.mark.slow
async def test_autotls_run_holds_the_order_for_the_delay_from_the_environment(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_e2e import (
        finish,
        poll,
        read_order,
        run_argv,
        stack_env,
        start_autotls,
        status,
        write_roots,
    )

    data_dir = tmp_path / "node"
    roots = write_roots(stack, tmp_path / "roots.pem")
    env = {**stack_env(stack), "AUTOTLS_REGISTRATION_DELAY": "1h"}
    process = await start_autotls(*run_argv(stack, data_dir, roots), env=env)

    async def held() -> bool:
        snap = await read_order(data_dir / "autotls.db")
        return snap is not None and snap.data.get("held_because") == "registration_delay"

    try:
        await poll(held, "the order held for the registration delay")
        [row] = await status(data_dir, capsys)
        snap = await read_order(data_dir / "autotls.db")
    finally:
        process.send_signal(signal.SIGTERM)
        stopped = await finish(process)
    assert row["state"] == "Registered"
    assert "the registration delay (1:00:00 after the node came up" in str(row["waiting_for"])
    assert snap is not None and not snap.data.get("order_url")
    assert stopped.code == 0, stopped.err
    assert "Registered -> Registered (registration_held)" in stopped.err
