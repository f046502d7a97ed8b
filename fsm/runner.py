"""The step runner: one claimed order's step, from its snapshot to the committed result.

* The step runs under its lease, renewed every third of the lease while it runs; a runner
  that still loses it finds its commit refused by the fence and drops the result.
* Before a step talks to anyone, the policy may decide alone: an order of another CA starts
  over (``ca_changed``), one whose authorization lapses before its next try re-orders.
* One bad order never stops the worker: corrupt rows are failed and set aside, exceptions
  become classified retries or failures of that order only (a bug is class ``internal``:
  one log line, retried on the slow schedule, never Failed by itself).
* A :class:`StepObserver` (recordings, replays: :mod:`autotls.recording`) sees each step
  start, in the step's own task, and end, with the plan and whether it was committed; every
  committed move is told to the subscribed listeners as an :class:`OrderEvent`.

:class:`~autotls.fsm.worker.Worker` is a :class:`StepRunner` with the loop that claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from autotls.fsm.errors import AutoTLSError
from autotls.fsm.faults import FaultPlan, FaultPoint
from autotls.fsm.machine import State, Trigger
from autotls.fsm.policy import (
    plan_ca_changed,
    plan_error,
    plan_lapsed,
    plan_outcome,
    plan_unexpected,
)
from autotls.fsm.ports import Ports
from autotls.fsm.steps import STEPS, Step
from autotls.persistence.errors import describe_database_error
from autotls.persistence.records import CommitPlan, OrderSnapshot
from autotls.persistence.store import ClaimedOrder, CorruptOrder, Store

log = logging.getLogger("autotls.worker")


@dataclass(frozen=True)
class OrderEvent:
    """What happened to an order in one commit (for callbacks, metrics, progress): the
    ``"transition"`` event of :meth:`autotls.AutoTLS.on`.

    ``trigger`` is the move the journal recorded, ``None`` when the order stayed where it was
    (a wait, or a classified error it will retry: then ``error_class`` and ``message`` say
    which). ``problem`` is the server's problem document behind the error, if any."""

    order_id: int
    peer_id: str
    from_state: str
    to_state: str
    trigger: Trigger | None
    error_class: str | None
    message: str | None
    next_run_at: datetime | None
    problem: Mapping[str, Any] | None = None
    # How long the step took (monotonic seconds, the commit excluded); None when no step ran
    # (a corrupt row set aside). Step-latency metrics read it.
    step_seconds: float | None = None
    # Why the order waits after this commit (what ``autotls status`` shows), if it does.
    waiting_for: str | None = None


EventListener = Callable[[OrderEvent], Awaitable[None] | None]


def order_fields(
    order_id: int | None,
    peer_id: str | None,
    state: str | None,
    *,
    trigger: str | None = None,
    error_class: str | None = None,
) -> dict[str, object]:
    """The ``extra=`` of every log line about an order: the fields structured logging
    (``autotls run --log-format json``) shows next to the message."""
    return {
        "order_id": order_id,
        "peer": peer_id,
        "state": state,
        "trigger": trigger,
        "error_class": error_class,
    }


class StepObserver(Protocol):
    """Sees every step the worker runs: a recording writes it down, a replay checks it.

    ``step_started`` is called in the task that runs the step, after the order was claimed and
    before the step reads the clock or calls a port, so a context variable it sets holds for
    every port call of that step (and for nothing else: the lease keeper runs in a task of
    its own). ``step_ended`` follows the commit (``committed`` False: the commit failed or
    the lease was lost, and nothing was written); it is not called when the step was
    cancelled. Either may not raise: a failing observer is logged and ignored."""

    def step_started(self, snap: OrderSnapshot) -> None: ...

    def step_ended(
        self, snap: OrderSnapshot, plan: CommitPlan, *, now: datetime, committed: bool
    ) -> None: ...


class StepRunner:
    """Runs the step of one claimed order and commits its result (the worker's half that
    knows nothing of claiming). Its attributes are set by :class:`~autotls.fsm.worker.Worker`."""

    store: Store
    ports: Ports
    id: str
    lease: timedelta
    faults: FaultPlan
    step_observer: StepObserver | None
    _listeners: list[EventListener]
    steps_run: int
    lost_leases: int
    lease_renewals: int

    def subscribe(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    async def _process(self, claimed: ClaimedOrder) -> None:
        if isinstance(claimed, CorruptOrder):
            await self._set_aside(claimed)
            return
        snap = claimed
        try:
            state = State(snap.state)
            step = STEPS[state]
        except (ValueError, KeyError):
            await self._set_aside(
                CorruptOrder(snap.id, snap.fence, snap.peer_id, snap.state, "unknown state")
            )
            return
        self.faults.hit(FaultPoint.BEFORE_EFFECT, snap.state)
        keeper = asyncio.ensure_future(self._keep_lease(snap))
        self._observe(lambda o: o.step_started(snap))
        started = time.monotonic()
        try:
            plan = await self._run_step(step, snap)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(snap.id, snap.fence))
            raise
        finally:
            keeper.cancel()
        step_seconds = time.monotonic() - started
        self.steps_run += 1
        self.faults.hit(FaultPoint.AFTER_EFFECT, snap.state)
        now = self.ports.clock.now()
        try:
            committed = await self.store.commit(snap, plan, now=now, worker=self.id)
        except Exception as exc:
            self._observe(lambda o: o.step_ended(snap, plan, now=now, committed=False))
            # E.g. a unique index refused the new state, or the database went read-only. The
            # lease runs out and the order is retried; nothing half-done was written (the
            # commit is one transaction).
            log.warning(
                "order %s: commit failed: %s",
                snap.id,
                describe_database_error(exc),
                extra=order_fields(snap.id, snap.peer_id, snap.state),
            )
            log.debug(
                "order %s: commit failure",
                snap.id,
                exc_info=True,
                extra=order_fields(snap.id, snap.peer_id, snap.state),
            )
            return
        self._observe(lambda o: o.step_ended(snap, plan, now=now, committed=committed))
        if not committed:
            self.lost_leases += 1
            log.warning(
                "order %s: lease lost while in %s; result dropped",
                snap.id,
                snap.state,
                extra=order_fields(snap.id, snap.peer_id, snap.state),
            )
            return
        self.faults.hit(FaultPoint.AFTER_COMMIT, snap.state)
        await self._announce(snap, plan, step_seconds)

    async def _run_step(self, step: Step, snap: OrderSnapshot) -> CommitPlan:
        clock, settings, rng = self.ports.clock, self.ports.settings, self.ports.rng
        moved = plan_ca_changed(snap, self.ports.acme.directory_url, clock.now())
        if moved is not None:  # the operator switched CA: this one knows nothing of the order
            return moved
        lapsed = plan_lapsed(snap, clock.now())
        if lapsed is not None:  # e.g. back after downtime: the authorization is gone
            return lapsed
        try:
            outcome = await step(snap, self.ports)
            return plan_outcome(snap, outcome, clock.now())
        except AutoTLSError as error:
            return plan_error(snap, error, clock.now(), settings, rng)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, InvalidTransitionError included: class internal
            # One line at the default verbosity (the commit's warning says when it is tried
            # again); the traceback is for whoever turned on debug logging.
            log.debug(
                "order %s: traceback of the internal error in step %s",
                snap.id,
                snap.state,
                exc_info=True,
                extra=order_fields(snap.id, snap.peer_id, snap.state, error_class="internal"),
            )
            return plan_unexpected(snap, exc, clock.now(), settings, rng)

    def _observe(self, call: Callable[[StepObserver], None]) -> None:
        if self.step_observer is None:
            return
        try:
            call(self.step_observer)
        except Exception:  # an observer's bug must not cost the order its step
            log.exception("step observer failed")

    async def _keep_lease(self, snap: OrderSnapshot) -> None:
        period = self.lease.total_seconds() / 3
        clock = self.ports.clock
        while True:
            await clock.sleep_until(clock.now() + timedelta(seconds=period))
            until = clock.now() + self.lease
            try:
                if not await self.store.renew_lease(snap.id, snap.fence, self.id, until):
                    log.warning(
                        "order %s: lease taken over during a long step",
                        snap.id,
                        extra=order_fields(snap.id, snap.peer_id, snap.state),
                    )
                    return
                self.lease_renewals += 1
            except Exception as exc:
                log.warning(
                    "order %s: lease renewal failed: %s",
                    snap.id,
                    describe_database_error(exc),
                    extra=order_fields(snap.id, snap.peer_id, snap.state),
                )

    async def _set_aside(self, order: CorruptOrder) -> None:
        log.error(
            "order %s is corrupt and is set aside as Failed: %s",
            order.id,
            order.error,
            extra=order_fields(order.id, order.peer_id, order.state, error_class="permanent"),
        )
        now = self.ports.clock.now()
        if await self.store.fail_corrupt(
            order,
            failed_state=State.FAILED.value,
            trigger=Trigger.CORRUPT.value,
            now=now,
            worker=self.id,
        ):
            await self._emit(
                OrderEvent(
                    order.id,
                    order.peer_id or "?",
                    order.state or "?",
                    State.FAILED.value,
                    Trigger.CORRUPT,
                    "permanent",
                    f"corrupt order row: {order.error}",
                    None,
                )
            )

    async def _announce(self, snap: OrderSnapshot, plan: CommitPlan, step_seconds: float) -> None:
        moved = plan.journal is not None and plan.journal.trigger != Trigger.RETRY_LATER
        trigger = Trigger(plan.journal.trigger) if plan.journal and moved else None
        extra = order_fields(
            snap.id,
            snap.peer_id,
            plan.to_state,
            trigger=trigger.value if trigger is not None else None,
            error_class=plan.last_error_class,
        )
        note = plan.data.get("waiting_for")
        # An error keeps the row's data as it was: its note is the previous wait's.
        waiting = note if isinstance(note, str) and plan.last_error_class is None else None
        if trigger and waiting:
            # A move into a wait (a held registration): nothing happens until what it waits
            # for changes, so say what that is, once.
            log.warning(
                "order %s: %s -> %s (%s): waiting for %s",
                snap.id,
                snap.state,
                plan.to_state,
                trigger,
                waiting,
                extra=extra,
            )
        elif trigger:
            log.info(
                "order %s: %s -> %s (%s)", snap.id, snap.state, plan.to_state, trigger, extra=extra
            )
        elif plan.last_error_class:
            log.warning(
                "order %s: %s in %s, next try %s: %s",
                snap.id,
                plan.last_error_class,
                snap.state,
                plan.next_run_at.isoformat(),
                plan.last_error_message,
                extra=extra,
            )
        else:
            log.debug(
                "order %s: waiting in %s until %s",
                snap.id,
                snap.state,
                plan.next_run_at,
                extra=extra,
            )
        await self._emit(
            OrderEvent(
                snap.id,
                snap.peer_id,
                snap.state,
                plan.to_state,
                trigger,
                plan.last_error_class,
                plan.last_error_message,
                plan.next_run_at,
                problem=plan.last_problem,
                step_seconds=step_seconds,
                waiting_for=waiting,
            )
        )

    async def _emit(self, event: OrderEvent) -> None:
        for listener in self._listeners:
            try:
                result = listener(event)
                if result is not None:
                    await result
            except Exception:
                log.exception(
                    "event listener failed for order %s",
                    event.order_id,
                    extra=order_fields(event.order_id, event.peer_id, event.to_state),
                )
