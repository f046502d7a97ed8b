"""Random interleavings against the engine's invariants (Hypothesis stateful testing).

Rules: create orders for a few peers, run workers (several, with independent leases), crash
them at random fault points (they die holding their leases), let time pass (leases expire,
waits end), make the fake CA, broker and DNS misbehave, act as an operator (retry, force a
renewal, record a revocation with it), and corrupt a row's data (the worker sets it aside).
After every rule:

* never two active orders for one peer;
* never a lost certificate (rows only accumulate; an Installed order points at one);
* every order's journal is a valid walk through the declared machine: every entry, the
  creating one, retried errors, set-aside rows and operator moves included;
* no claim was committed twice (the journal's (order, fence) pairs are unique).

At the end the faults stop and a healthy worker must bring every order to Installed (or to
Failed where a permanent error was injected or the row was corrupted). Derandomized so CI is
reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import text

from autotls.fsm import operator
from autotls.fsm.clock import ManualClock
from autotls.fsm.errors import OrderInvalidError, PermanentError, RateLimitedError, TransientError
from autotls.fsm.faults import FaultPlan, FaultPoint, FaultRule, InjectedCrash
from autotls.fsm.journal import is_valid_journal
from autotls.fsm.machine import State, Trigger
from autotls.fsm.ports import Ports
from autotls.fsm.worker import Worker, run_until_idle
from autotls.peerid import PrivateKey
from autotls.persistence.errors import ActiveOrderExistsError, OrderBusyError, OrderStateError
from autotls.persistence.store import CorruptOrder, Store
from tests.fakes.ports import FakeBroker, FakeCA, FakeDns, FakeInstaller, acme_problem

T = TypeVar("T")
PEERS = [PrivateKey.generate().peer_id.to_base36() for _ in range(3)]
STEP_STATES = [s.value for s in State if s is not State.FAILED]
CA_OPERATIONS = [
    "register_account",
    "new_order",
    "get_order",
    "get_authorization",
    "answer_challenge",
    "finalize",
    "download_certificate",
]


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="autotls-stateful-"))
        self.clock = ManualClock()
        self.ca = FakeCA(self.clock)
        self.dns = FakeDns()
        self.broker = FakeBroker(self.dns)
        self.installer = FakeInstaller()
        self.ports = Ports(
            acme=self.ca,
            broker=self.broker,
            dns=self.dns,
            installer=self.installer,
            clock=self.clock,
            rng=random.Random(0),
        )
        self.store: Store = self.run(Store.open(f"sqlite:///{self.tmp / 'db.sqlite'}"))
        self.workers: list[Worker] = []
        self.generation = 0
        self.certificates_seen = 0
        self.permanent_injected = False
        self.corrupted: set[int] = set()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.settle()
        finally:
            self.run(self.store.close())
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def worker(self, faults: FaultPlan | None = None) -> Worker:
        self.generation += 1
        return Worker(
            self.store, self.ports, worker_id=f"w{self.generation}", concurrency=2, faults=faults
        )

    # -- rules ---------------------------------------------------------------------------

    @rule(peer=st.sampled_from(PEERS))
    def create_order(self, peer: str) -> None:
        with contextlib.suppress(ActiveOrderExistsError):
            self.run(
                operator.create_order(
                    self.store, peer, f"*.{peer}.libp2p.direct", now=self.clock.now()
                )
            )

    @rule()
    def run_a_healthy_worker_once(self) -> None:
        self.run(self.worker().run_once())

    @rule(rounds=st.integers(5, 20))
    def a_healthy_worker_runs_a_while(self, rounds: int) -> None:
        """Long enough, with waits jumped over, for orders to reach Installed mid-example, so
        that operator moves and renewals meet them there."""
        for _ in range(rounds):
            if self.run(self.settled()):
                return
            if not self.run(self.worker().run_once()):
                due = self.run(self.store.next_due_at())
                if due is None:
                    return
                self.clock.set(max(due, self.clock.now()))

    @rule(
        point=st.sampled_from(list(FaultPoint)),
        state=st.sampled_from(STEP_STATES),
    )
    def run_a_worker_that_dies(self, point: FaultPoint, state: str) -> None:
        doomed = self.worker(FaultPlan([FaultRule(point, state, None, "raise")]))
        with contextlib.suppress(InjectedCrash):  # it dies where it stands, leases held
            self.run(doomed.run_once())

    @rule(seconds=st.sampled_from([1, 5, 61, 600, 3600, 86400]))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(
        operation=st.sampled_from(CA_OPERATIONS),
        error=st.sampled_from(["transient", "rate_limited", "bad_nonce", "order_invalid"]),
    )
    def the_ca_misbehaves(self, operation: str, error: str) -> None:
        errors = {
            "transient": TransientError("connection reset by peer"),
            "rate_limited": RateLimitedError("slow down", retry_after=120),
            "bad_nonce": acme_problem("badNonce", "bad nonce", 400),
            "order_invalid": OrderInvalidError("order went invalid"),
        }
        self.ca.fail(operation, errors[error])

    @rule()
    def the_ca_forgets_its_accounts(self) -> None:
        self.ca.forget_accounts()

    @rule(kind=st.sampled_from(["transient", "dial", "down"]))
    def the_broker_misbehaves(self, kind: str) -> None:
        if kind == "down":
            self.broker.healthy = not self.broker.healthy
        else:
            self.broker.fail(TransientError(f"error testing addresses: {kind}"))

    @rule(lag=st.integers(0, 3))
    def dns_is_slow(self, lag: int) -> None:
        self.dns.lag = lag

    @rule()
    def a_permanent_error(self) -> None:
        self.permanent_injected = True
        self.installer.fail(PermanentError("certificate rejected by the installer"))

    @rule(action=st.sampled_from(["retry", "force_renewal", "revoke"]))
    def an_operator_acts(self, action: str) -> None:
        now = self.clock.now()
        for order in self.run(self.store.list_orders()):
            if isinstance(order, CorruptOrder):
                continue
            try:
                if action == "retry":
                    self.run(operator.retry(self.store, order.id, now=now, actor="operator"))
                else:
                    self.run(
                        operator.force_renewal(
                            self.store,
                            order.id,
                            now=now,
                            actor="operator",
                            revoked=action == "revoke",
                            reason="superseded",
                        )
                    )
            except (OrderBusyError, OrderStateError, ActiveOrderExistsError):
                pass

    @rule(pick=st.integers(0, 5))
    def a_row_is_corrupted(self, pick: int) -> None:
        """Someone edits an active row's data by hand into something that is not JSON."""
        orders = [
            o
            for o in self.run(self.store.list_orders())
            if not isinstance(o, CorruptOrder) and o.state != State.FAILED.value
        ]
        if not orders:
            return
        victim = orders[pick % len(orders)].id

        async def corrupt() -> None:
            async with self.store.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE orders SET data = '{\"half\": ' WHERE id = :id"), {"id": victim}
                )

        self.run(corrupt())
        self.corrupted.add(victim)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def at_most_one_active_order_per_peer(self) -> None:
        async def count() -> list[Any]:
            async with self.store.engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT peer_id, count(*) FROM orders WHERE state != 'Failed' "
                        "GROUP BY peer_id HAVING count(*) > 1"
                    )
                )
                return list(rows)

        assert self.run(count()) == []

    @invariant()
    def certificates_are_never_lost(self) -> None:
        certs = self.run(self.store.certificates())
        assert len(certs) >= self.certificates_seen
        self.certificates_seen = len(certs)
        for order in self.run(self.store.list_orders()):
            if isinstance(order, CorruptOrder):
                assert order.id in self.corrupted
                continue
            if order.state in (State.INSTALLED.value, State.RENEW_DUE.value):
                assert order.certificate is not None

    @invariant()
    def journals_are_valid_and_claims_commit_once(self) -> None:
        for order in self.run(self.store.list_orders()):
            entries = self.run(self.store.journal(order.id))
            assert is_valid_journal(entries), [
                (e.from_state, e.to_state, e.trigger) for e in entries
            ]
            fences = [e.fence for e in entries]
            assert len(fences) == len(set(fences))

    # -- the end -------------------------------------------------------------------------

    async def settled(self) -> bool:
        rows = await self.store.list_orders()
        return all(r.state in (State.INSTALLED.value, State.FAILED.value) for r in rows)

    def settle(self) -> None:
        """Faults stop; a healthy worker finishes everything."""
        self.ca.heal()
        self.broker.heal()
        self.dns.lag = 0
        self.installer.heal()
        self.clock.advance(3600)  # every dead worker's lease has expired
        worker = self.worker()
        self.run(
            run_until_idle(
                worker, advance_clock=self.clock.set, stop_when=self.settled, max_rounds=3000
            )
        )
        for order in self.run(self.store.list_orders()):
            if isinstance(order, CorruptOrder):
                # Set aside, its bytes kept, by the declared move `corrupt`.
                assert order.id in self.corrupted and order.state == State.FAILED.value
                last = self.run(self.store.journal(order.id))[-1]
                assert last.trigger == Trigger.CORRUPT
            elif order.state == State.FAILED.value:
                assert self.permanent_injected, order.last_error_message
            else:
                assert order.state == State.INSTALLED.value
        self.journals_are_valid_and_claims_commit_once()
        self.at_most_one_active_order_per_peer()


EngineMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineStateful = EngineMachine.TestCase
