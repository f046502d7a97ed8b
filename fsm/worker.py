"""The worker: claim due orders, run one step each, commit, sleep until the next due time.

* Bounded concurrency: at most ``concurrency`` steps in flight; new claims fill free slots.
* No busy polling: when idle it sleeps until the store's next due time (or ``idle_poll``,
  to notice rows other processes add; :meth:`Worker.wake` cuts the sleep short). While
  :meth:`Worker.run` runs, a move another process commits for one of its peers (an
  operator's ``renew --force``, ``retry``, ``revoke``; a new order) wakes it at once
  (:meth:`~autotls.persistence.store.Store.on_change`): ``idle_poll`` is only the fallback.
* Long steps keep their lease alive (renewed every third of the lease); a worker that still
  loses it finds its commit refused by the fence and drops the result.
* On start (:meth:`Worker.prepare`): leases of a dead predecessor on this host (worker ids
  are ``host:pid:random``; its pid is gone) are ended at once instead of waited out, other
  running leases are named with their end, and orders waiting for a configuration fix are
  tried again (this process may have been started with it).
* A database that keeps refusing claims ends :meth:`Worker.run` after ``store_retries``
  attempts with one line naming it (:class:`~autotls.persistence.errors.StoreUnavailableError`).
* Graceful shutdown: stop claiming, give in-flight steps ``grace`` seconds to finish and
  commit, then cancel the rest and release their leases (nothing they did is committed, as
  if the process had died there; the next claim reconciles).
* A :class:`StepObserver` (recordings, replays: :mod:`autotls.recording`) sees each step
  start, in the step's own task, and end, with the plan and whether it was committed.
* One bad order never stops the worker: corrupt rows are failed and set aside, exceptions
  become classified retries or failures of that order only (a bug is class ``internal``:
  one log line, retried on the slow schedule, never Failed by itself), and database errors
  are logged and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from autotls.fsm.errors import AutoTLSError, ErrorClass
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
from autotls.persistence.changes import Change
from autotls.persistence.errors import StoreUnavailableError, describe_database_error
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


def default_worker_id() -> str:
    """``host:pid:random``: enough to tell, on the same host, whether the owner still runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_state(owner: str) -> str:
    """What can be told about the worker ``owner`` (an id from :func:`default_worker_id`)
    from this process: ``"dead"`` only when it ran on this host and its pid is gone; else
    why it may be alive. A reused pid reads as alive: the lease is then waited out, the safe
    side (and fencing refuses a late commit either way)."""
    host, sep, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if not sep or not pid_text.isdigit():
        return "not an autotls worker id"
    if host != socket.gethostname():
        return f"on host {host}"
    pid = int(pid_text)
    if pid == os.getpid():
        return "in this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return f"pid {pid} is running"
    return f"pid {pid} is running"


class Worker:
    def __init__(
        self,
        store: Store,
        ports: Ports,
        *,
        worker_id: str | None = None,
        concurrency: int = 4,
        lease: timedelta = timedelta(seconds=60),
        idle_poll: timedelta = timedelta(seconds=30),
        faults: FaultPlan | None = None,
        peers: Collection[str] | None = None,
        store_retries: int | None = 8,
        step_observer: StepObserver | None = None,
    ) -> None:
        """``faults``: where to crash (tests); by default the plan in ``AUTOTLS_FAULTS``, so
        any worker process can be crashed at a named point. ``store_retries``: consecutive
        database failures after which :meth:`run` gives up (None: never)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.store = store
        self.ports = ports
        self.id = worker_id or default_worker_id()
        self.concurrency = concurrency
        self.lease = lease
        self.idle_poll = idle_poll
        self.faults = faults if faults is not None else FaultPlan.from_env()
        self.store_retries = store_retries
        self.peers = frozenset(peers) if peers is not None else None
        self._listeners: list[EventListener] = []
        self.step_observer = step_observer
        self._wake = asyncio.Event()
        self.changes_seen = 0  # wake-ups by another process's commit
        self.steps_run = 0
        self.lost_leases = 0
        self.lease_renewals = 0

    # -- public -------------------------------------------------------------------------------

    def subscribe(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def wake(self) -> None:
        """New work may be due now (an order was created or retried)."""
        self._wake.set()

    def _store_changed(self, changes: Sequence[Change]) -> None:
        # Our own commits need no wake-up: the loop already knows what it just did.
        if any(c.concerns(self.peers) and c.actor != self.id for c in changes):
            self.changes_seen += 1
            self.wake()

    async def run_once(self) -> int:
        """Claim what is due now, run those steps concurrently, commit. Returns how many."""
        claimed = await self._claim(self.concurrency)
        if claimed:
            await asyncio.gather(*(self._process(c) for c in claimed))
        return len(claimed)

    async def run(self, stop: asyncio.Event, *, grace: float = 10.0) -> None:
        """Work until ``stop`` is set; then shut down gracefully.

        Raises :class:`~autotls.persistence.errors.StoreUnavailableError` when the database
        refused ``store_retries`` claims in a row (read-only, full, unreachable): a process
        that cannot record progress must end rather than spin."""
        inflight: set[asyncio.Task[None]] = set()
        db_failures = 0
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        unsubscribe = self.store.on_change(self._store_changed)
        try:
            await self.prepare()
            while not stop.is_set():
                free = self.concurrency - len(inflight)
                claimed: list[ClaimedOrder] = []
                # Cleared before the claim, never after it: a wake-up that arrives while we
                # claim or read the next due time must cut the coming sleep short.
                self._wake.clear()
                if free > 0:
                    try:
                        claimed = await self._claim(free)
                        db_failures = 0
                    except Exception as exc:
                        db_failures += 1
                        delay = self._store_trouble(exc, db_failures)
                        await self._sleep(timedelta(seconds=delay), stop_wait, inflight)
                        continue
                for order in claimed:
                    inflight.add(asyncio.ensure_future(self._process(order)))
                if claimed and len(inflight) < self.concurrency:
                    continue  # more may be due right now
                await self._sleep(await self._idle_for(inflight), stop_wait, inflight)
                inflight = {t for t in inflight if not t.done()}
        finally:
            unsubscribe()
            stop_wait.cancel()
            await self._shutdown(inflight, grace)

    async def prepare(self) -> None:
        """What a worker does once when it starts (:meth:`run` calls it):

        * take over the leases of dead predecessors on this host (:meth:`take_over_dead_leases`);
        * make orders that wait for a configuration fix due now: this process may have been
          started with the fix (``--trust-roots``), and they cost no request at the CA;
        * make orders whose account belongs to another ACME directory due now: the operator
          switched CA (``--staging`` to production), and they move to it at once
          (``ca_changed``) instead of at their next renewal."""
        now = self.ports.clock.now()
        try:
            await self.take_over_dead_leases()
            woken = await self.store.make_due(
                now=now, last_error_class=ErrorClass.CONFIGURATION.value, peers=self.peers
            )
            moving = await self.store.make_due(
                now=now, directory_url=self.ports.acme.directory_url, peers=self.peers
            )
        except Exception as exc:
            log.warning("worker start: %s", describe_database_error(exc))
            log.debug("worker start failed", exc_info=True)
            return
        if woken:
            log.info("%d order(s) waiting for a configuration fix: trying them again now", woken)
        if moving:
            log.warning(
                "%d order(s) belong to another ACME directory than %s: ordering anew from it "
                "(their certificates are served until then)",
                moving,
                self.ports.acme.directory_url,
            )

    async def take_over_dead_leases(self) -> list[int]:
        """End the running leases whose owner is provably dead: a worker of this host
        (``host:pid:...``) whose process is gone, as after a crash and restart. Other leases
        are left to expire, with one line saying what is waited for and until when. Returns
        the ids of the orders taken over."""
        now = self.ports.clock.now()
        taken = []
        for lease in await self.store.live_leases(now=now, peers=self.peers):
            if lease.owner == self.id:
                continue
            verdict = owner_state(lease.owner)
            if verdict == "dead" and await self.store.end_lease(lease, now=now):
                taken.append(lease.order_id)
                log.warning(
                    "order %s: took over the lease of %s, whose process is gone",
                    lease.order_id,
                    lease.owner,
                    extra=order_fields(lease.order_id, lease.peer_id, lease.state),
                )
            elif verdict != "dead":
                log.warning(
                    "order %s is leased to worker %s (%s) until %s: waiting for it",
                    lease.order_id,
                    lease.owner,
                    verdict,
                    lease.until.isoformat(timespec="seconds"),
                    extra=order_fields(lease.order_id, lease.peer_id, lease.state),
                )
        return taken

    def _store_trouble(self, exc: BaseException, failures: int) -> float:
        reason = describe_database_error(exc)
        where = self.store.describe()
        if self.store_retries is not None and failures >= self.store_retries:
            log.debug("the database failed %d times in a row", failures, exc_info=True)
            raise StoreUnavailableError(
                f"database {where} is unusable: {reason} ({failures} attempts)"
            ) from exc
        delay = min(60.0, 2.0**failures)
        # One line at the default verbosity; the traceback is for debug logging.
        log.warning(
            "database %s refused to hand out work: %s; retry %d%s in %.0fs",
            where,
            reason,
            failures,
            f" of {self.store_retries - 1}" if self.store_retries is not None else "",
            delay,
        )
        log.debug("database failure", exc_info=True)
        return delay

    # -- loop internals -----------------------------------------------------------------

    async def _claim(self, limit: int) -> list[ClaimedOrder]:
        return await self.store.claim_due(
            self.id,
            now=self.ports.clock.now(),
            lease_seconds=self.lease.total_seconds(),
            limit=limit,
            peers=self.peers,
        )

    async def _idle_for(self, inflight: set[asyncio.Task[None]]) -> timedelta:
        if len(inflight) >= self.concurrency:
            return self.idle_poll
        try:
            due = await self.store.next_due_at(peers=self.peers)
        except Exception as exc:
            log.warning("reading the next due time failed: %s", describe_database_error(exc))
            return timedelta(seconds=5)
        if due is None:
            return self.idle_poll
        return max(timedelta(0), min(self.idle_poll, due - self.ports.clock.now()))

    async def _sleep(
        self,
        duration: timedelta,
        stop_wait: asyncio.Future[Any],
        inflight: set[asyncio.Task[None]],
    ) -> None:
        """Sleep until ``duration`` passes, a step finishes, work is woken, or stop."""
        if duration <= timedelta(0):
            return
        sleeper: asyncio.Future[Any] = asyncio.ensure_future(
            self.ports.clock.sleep_until(self.ports.clock.now() + duration, self._wake)
        )
        waiting: set[asyncio.Future[Any]] = {sleeper, stop_wait, *inflight}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()

    async def _shutdown(self, inflight: set[asyncio.Task[None]], grace: float) -> None:
        if not inflight:
            return
        log.info("stopping: waiting up to %.0fs for %d step(s)", grace, len(inflight))
        _done, pending = await asyncio.wait(inflight, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- one order ------------------------------------------------------------------------

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


async def run_until_idle(
    worker: Worker,
    *,
    advance_clock: Callable[[datetime], None] | None = None,
    stop_when: Callable[[], Awaitable[bool]] | None = None,
    max_rounds: int = 10_000,
) -> int:
    """Drive a worker deterministically (tests, replays): run what is due; when nothing is,
    jump the clock (``advance_clock``) to the next due time. Returns the rounds taken."""
    for rounds in range(1, max_rounds + 1):
        if stop_when is not None and await stop_when():
            return rounds
        if await worker.run_once():
            continue
        due = await worker.store.next_due_at(peers=worker.peers)
        if due is None or advance_clock is None:
            return rounds
        advance_clock(max(due, worker.ports.clock.now()))
    raise RuntimeError(f"worker did not settle within {max_rounds} rounds")
