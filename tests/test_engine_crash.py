"""Crash at every fault point of every step, then resume (design.md rule 12).

A worker is "killed" at a named point -- before the step's effect, after the effect but
before its commit, after the commit -- with the lease still held, exactly as a dead process
leaves it. A fresh worker with fresh adapters then takes over once the lease expires. Every
run must end Installed with exactly one certificate, at most one extra ACME order for the
crash, and a journal that is a valid path through the machine.

In-process crashes cover every point of every step invocation (steps that record an intent
run twice or three times per state); ``test_sigkill_*`` does the same with a real SIGKILL of
a worker process at the points where a crash costs the most.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

from autotls.fsm import operator
from autotls.fsm.faults import ENV_VAR, FaultPlan, FaultPoint, FaultRule, InjectedCrash
from autotls.fsm.journal import is_valid_journal
from autotls.fsm.machine import State
from autotls.peerid import save_private_key
from tests.fixtures.engine import open_engine
from tests.fixtures.realstack import CountingAcme, RealStack

pytestmark = pytest.mark.usefixtures("libp2p_installed")


def step_invocations() -> dict[State, int]:
    """How many times each step runs in its state on the way to Installed (an intent, the
    effect, a poll...): counted, not listed, by driving one order through the same steps on
    the in-memory fakes with an empty fault plan, which counts the points it passes. Should
    the real stack ever pass a point fewer times, ``plan.fired`` below says so."""

    async def drive() -> dict[State, int]:
        plan = FaultPlan([])
        with tempfile.TemporaryDirectory() as tmp:
            async with open_engine(Path(tmp) / "count.db") as engine:
                order = await engine.order()
                await engine.drive_to(order.id, State.INSTALLED, engine.worker(faults=plan))
        return {
            State(state): count
            for (point, state), count in plan.seen.items()
            if point is FaultPoint.BEFORE_EFFECT
        }

    return asyncio.run(drive())


INVOCATIONS = step_invocations()
SCENARIOS = [
    (point, state, n)
    for state, count in INVOCATIONS.items()
    for n in range(1, count + 1)
    for point in FaultPoint
]


def _id(scenario: tuple[FaultPoint, State, int]) -> str:
    point, state, n = scenario
    return f"{point.value}@{state.value}#{n}"


async def crash_then_resume(stack: RealStack, rule: FaultRule, order_id: int) -> None:
    plan = FaultPlan([rule])
    with pytest.raises(InjectedCrash):
        await stack.drive(stack.worker(faults=plan), order_id, [State.INSTALLED, State.FAILED])
    assert plan.fired, "the fault point was never reached"
    survivor = stack.worker()
    await stack.drive(survivor, order_id, [State.INSTALLED, State.FAILED])


async def assert_recovered(stack: RealStack, order_id: int, certificates: int = 1) -> None:
    snap = await stack.store.get_order(order_id)
    assert snap.state == State.INSTALLED.value, (snap.state, snap.last_error_message)
    certs = await stack.store.certificates(order_id=order_id)
    assert len(certs) == certificates
    assert snap.certificate is not None and snap.certificate.id == certs[-1].id
    chain_file = stack.workdir / "data" / "certs" / snap.peer_id / "fullchain.pem"
    assert chain_file.read_text() == certs[-1].chain_pem
    assert is_valid_journal(await stack.store.journal(order_id))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_id)
async def test_crash_at_every_fault_point_then_resume(
    scenario: tuple[FaultPoint, State, int], real_stack: RealStack
) -> None:
    point, state, n = scenario
    order = await real_stack.order()
    await crash_then_resume(real_stack, FaultRule(point, state.value, n, "raise"), order.id)
    await assert_recovered(real_stack, order.id)
    assert CountingAcme.new_orders <= 2, "at most one extra ACME order per crash"


@pytest.mark.parametrize("point", list(FaultPoint), ids=lambda p: p.value)
async def test_crash_in_the_installed_step_then_resume(
    point: FaultPoint, real_stack: RealStack
) -> None:
    order = await real_stack.order()
    await real_stack.drive(real_stack.worker(), order.id, [State.INSTALLED])
    plan = FaultPlan([FaultRule(point, State.INSTALLED.value, 1, "raise")])
    with pytest.raises(InjectedCrash):
        await real_stack.worker(faults=plan).run_once()
    held = await real_stack.store.get_order(order.id)
    if held.lease_until is not None:
        real_stack.clock.set(held.lease_until)
    await real_stack.worker().run_once()
    snap = await real_stack.store.get_order(order.id)
    assert snap.state == State.INSTALLED.value
    assert snap.data["renewal"]["reason"] == "backstop"
    assert snap.next_run_at > real_stack.clock.now() + timedelta(days=365)
    await assert_recovered(real_stack, order.id)


@pytest.mark.parametrize("point", list(FaultPoint), ids=lambda p: p.value)
async def test_crash_when_renewal_is_due_then_resume(
    point: FaultPoint, real_stack: RealStack
) -> None:
    order = await real_stack.order()
    await real_stack.drive(real_stack.worker(), order.id, [State.INSTALLED])
    await operator.force_renewal(
        real_stack.store, order.id, now=real_stack.clock.now(), actor="test"
    )
    before = CountingAcme.new_orders
    await crash_then_resume(
        real_stack, FaultRule(point, State.RENEW_DUE.value, 1, "raise"), order.id
    )
    await assert_recovered(real_stack, order.id, certificates=2)
    assert CountingAcme.new_orders - before <= 2


REPO = Path(__file__).resolve().parent.parent
KILL_POINTS = [
    "after_effect@Registered#2",  # the CA made the order; its URL was never committed
    # The first order poll after the answer: Pebble (no VA sleep) has validated within the
    # first 25 ms, so the order is ready and finalized in this step; nothing committed.
    "after_effect@DNSPropagated#2",
    "after_effect@Finalized#2",  # certificate written and served; the commit never happened
    "before_effect@Challenged#1",  # killed holding the lease before talking to the broker
]


@pytest.mark.slow
@pytest.mark.parametrize("fault", KILL_POINTS)
async def test_sigkill_at_a_fault_point_then_resume(fault: str, real_stack: RealStack) -> None:
    order = await real_stack.order()
    peer = order.peer_id
    key_file = real_stack.workdir / "peer.key"
    save_private_key(real_stack.keys[peer], key_file)
    roots_file = real_stack.workdir / "roots.pem"
    roots_file.write_text("".join(real_stack.pebble.issuer_roots_pem()))
    env = {**os.environ, ENV_VAR: fault + ":kill"}
    argv = [
        sys.executable,
        "-m",
        "tests.crash_worker",
        "--db",
        real_stack.store.url.render_as_string(hide_password=False),
        "--directory",
        real_stack.pebble.directory_url,
        "--ca-file",
        str(real_stack.pebble.ca_file),
        "--broker",
        real_stack.broker.url,
        "--dns",
        "{}:{}".format(*real_stack.pebble.dns_address),
        "--key",
        str(key_file),
        "--roots",
        str(roots_file),
        "--data-dir",
        str(real_stack.workdir / "data"),
        "--order",
        str(order.id),
        *[arg for a in real_stack.nodes[peer].listen_addresses for arg in ("--address", a)],
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == -9, output.decode(errors="replace")[-2000:]
    killed_in = await real_stack.store.get_order(order.id)
    assert killed_in.lease_owner is not None, "a killed worker leaves its lease behind"
    survivor = real_stack.worker()
    await real_stack.drive(survivor, order.id, [State.INSTALLED, State.FAILED])
    await assert_recovered(real_stack, order.id)
    ordered = len([line for line in output.decode().splitlines() if "newOrder" in line])
    assert CountingAcme.new_orders + ordered <= 2
