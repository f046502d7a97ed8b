"""From a step's result to the row's next version: the engine's rules in one place.

* An :class:`~autotls.fsm.outcomes.Advance` fires its trigger through the machine (guards included);
  a :class:`~autotls.fsm.outcomes.Wait` keeps the state and sets ``next_run_at``.
* Errors by class (design.md rule 8; the classes are defined in :mod:`autotls.fsm.errors`):

  ============== ===============================================================
  transient      ``retry_later``: stay; jittered exponential backoff, or Retry-After
  rate_limited   stay; wait for Retry-After (default one hour)
  order_invalid  count against the validation budget; ``reorder`` after Let's
                 Encrypt's 1 min / 10 min / 100 min / daily schedule, and not
                 before the budget window frees a slot
  permanent      ``fail`` -> Failed, with the problem document
  configuration  stay (the order holds what the CA issued: never Failed, never
                 a new order); Let's Encrypt's schedule, and at once when a
                 worker starts or an operator retries
  local          stay; backoff as for transient (our disk, not the CA)
  internal       stay; Let's Encrypt's schedule. A bug never makes an order
                 Failed by itself: the operator sees class ``internal``
  ============== ===============================================================

  Every error is journaled as a declared move: ``retry_later`` (the order stays, with the
  error class in the entry), ``reorder``, ``fail`` or ``account_lost``.
  Typed port errors pick a move of their own: :class:`~autotls.fsm.errors.AccountUnknownError`
  (the CA forgot our account) fires ``account_lost``;
  :class:`~autotls.fsm.errors.CertificateUnusableError` (the issued certificate itself fails
  verification) fails the order with the chain set aside as ``rejected_chain``, so ``retry``
  orders anew. An exception that is not an
  ``AutoTLSError`` is a bug and is recorded as class ``internal`` (:func:`plan_unexpected`).

An order whose account belongs to another ACME directory than the worker's (the operator
switched CA) starts over from New with ``ca_changed`` before any step talks to the new CA
about the old CA's order (:func:`plan_ca_changed`).

Retry-After always wins over our own backoff. Every wait is written into the row, so a
restarted worker resumes the same schedule (rule 7).

No wait outlives the order it waits for (:func:`plan_lapsed`, applied to every plan that keeps
an order where it is, and by the worker before a step runs): while an order needs its pending
authorization (Challenged, BrokerNotified, DNSPropagated), a next try that would come after
that authorization -- or the order -- expires re-orders instead, not before the old one is
gone (Boulder hands back a pending order for the same names) and without counting a failed
validation. Let's Encrypt's ``shortlived`` profile gives an authorization one hour, less than
a backoff, a rate-limit wait or the 100-minute step of the slow schedule; and Boulder answers
404 for an expired authorization, which would otherwise fail the order.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from autotls.fsm.data import (
    ORDER_KEYS,
    WAIT_KEYS,
    CertificateIssued,
    ChainDownloaded,
    Keys,
    OrderData,
    RenewalPlanned,
    RenewalTarget,
    keys,
    order_data,
    without,
)
from autotls.fsm.errors import (
    AccountUnknownError,
    AutoTLSError,
    CertificateUnusableError,
    ErrorClass,
    InternalError,
)
from autotls.fsm.journal import sanitize
from autotls.fsm.machine import ORDERING_STATES, Mover, State, Trigger, fire
from autotls.fsm.outcomes import Effects, Outcome, Wait
from autotls.fsm.ports import EngineSettings
from autotls.fsm.steps import AUTHZ_EXPIRY_MARGIN, iso
from autotls.persistence.records import AccountUpdate, CommitPlan, JournalNote, OrderSnapshot

MAX_RETRY_AFTER = timedelta(days=1)
# States that still need the order's pending authorization (see plan_lapsed).
PENDING_AUTHZ_STATES = frozenset({State.CHALLENGED, State.BROKER_NOTIFIED, State.DNS_PROPAGATED})


def merge(data: Mapping[str, Any], updates: OrderData, clear: Keys) -> OrderData:
    merged = without(data, clear)
    merged.update(updates)
    return merged


def _plan(
    snap: OrderSnapshot,
    *,
    to_state: str,
    data: Mapping[str, Any],
    next_run_at: datetime,
    attempts: int,
    error: AutoTLSError | None,
    journal: JournalNote | None,
    effects: Effects,
) -> CommitPlan:
    return CommitPlan(
        to_state=to_state,
        data=data,
        next_run_at=next_run_at,
        attempts=attempts,
        last_error_class=error.error_class.value if error else None,
        last_error_message=error.message if error else None,
        last_problem=sanitize(error.problem) if error and error.problem else None,
        journal=journal,
        new_account=effects.new_account,
        account_update=effects.account_update,
        cert_key_pem=effects.cert_key_pem,
        new_certificate=effects.new_certificate,
    )


def plan_outcome(snap: OrderSnapshot, outcome: Outcome, now: datetime) -> CommitPlan:
    if isinstance(outcome, Wait):
        data = merge(snap.data, outcome.updates, frozenset())
        data["waiting_for"] = outcome.reason
        plan = _plan(
            snap,
            to_state=snap.state,
            data=data,
            next_run_at=max(outcome.until, now),
            attempts=0,
            error=None,
            journal=None,
            effects=outcome.effects,
        )
        return plan_lapsed(snap, plan.next_run_at, plan) or plan
    # A move makes what the step said about its wait untrue.
    data = merge(snap.data, outcome.updates, outcome.clear | WAIT_KEYS)
    to_state = fire(snap.state, outcome.trigger, data, by=Mover.STEP)
    return _plan(
        snap,
        to_state=to_state.value,
        data=data,
        next_run_at=outcome.run_at or now,
        attempts=0,
        error=None,
        journal=JournalNote("transition", outcome.trigger.value, sanitize(outcome.note)),
        effects=outcome.effects,
    )


def _error_detail(error: AutoTLSError) -> Mapping[str, Any]:
    detail: dict[str, Any] = {"error_class": error.error_class.value, "message": error.message}
    if error.problem:
        detail["problem"] = error.problem
    if error.retry_after is not None:
        detail["retry_after"] = error.retry_after
    cleaned: Mapping[str, Any] = sanitize(detail)
    return cleaned


def backoff(attempt: int, settings: EngineSettings, rng: random.Random) -> timedelta:
    """Exponential backoff with jitter in [50 %, 100 %] of the step, capped."""
    base = settings.transient_backoff_base.total_seconds()
    cap = settings.transient_backoff_cap.total_seconds()
    step = min(cap, base * (2 ** max(0, attempt - 1)))
    return timedelta(seconds=step * rng.uniform(0.5, 1.0))


def _retry_after(error: AutoTLSError, default: timedelta) -> timedelta:
    if error.retry_after is None or error.retry_after < 0:
        return default
    return min(timedelta(seconds=error.retry_after), MAX_RETRY_AFTER)


def _stay(snap: OrderSnapshot, error: AutoTLSError, until: datetime) -> CommitPlan:
    """``retry_later``: the order keeps its state and data and is tried again at ``until``
    (unless that comes too late for its pending authorization: :func:`plan_lapsed`)."""
    to_state = fire(snap.state, Trigger.RETRY_LATER, snap.data, by=Mover.POLICY)
    plan = _plan(
        snap,
        to_state=to_state.value,
        data=dict(snap.data),
        next_run_at=until,
        attempts=snap.attempts + 1,
        error=error,
        journal=JournalNote("error", Trigger.RETRY_LATER.value, _error_detail(error)),
        effects=Effects(),
    )
    return plan_lapsed(snap, until, plan) or plan


def order_lapses_at(snap: OrderSnapshot) -> datetime | None:
    """When the order in flight stops being usable for the step it is in: the earlier of its
    pending authorization's and its own expiry, in the states that need the authorization;
    None elsewhere (in Validated the order may be finalized already, and a finalized order
    outlives its expiry: there the CA's answer decides)."""
    if snap.state not in PENDING_AUTHZ_STATES:
        return None
    data = order_data(snap.data)
    moments = [_parse(data["authz_expires"]), _parse(data["order_expires"])]
    known = [moment for moment in moments if moment is not None]
    if not known:
        return None
    lapses = min(known)
    intent = data["new_order_intent"]
    ordered = _parse(intent.get("at")) if isinstance(intent, Mapping) else None
    if ordered is not None and lapses <= ordered + AUTHZ_EXPIRY_MARGIN:
        # Expired, by our clock, before we even asked for it: the CA's clock and ours
        # disagree by about the authorization's lifetime. No deadline can be trusted, and
        # re-ordering on one would only loop; the CA's answers decide, as they did before.
        return None
    return lapses


def plan_lapsed(
    snap: OrderSnapshot, next_try: datetime, plan: CommitPlan | None = None
) -> CommitPlan | None:
    """A re-order, when the order's next try (``next_try``; the worker asks with the current
    time before running a step) comes too late for its pending authorization; else None.

    ``plan`` is what would have been committed otherwise (its error and attempts stay, for
    the operator). The new order is placed at the planned time, but not before the old
    authorization has expired: until then Boulder would hand the same order back."""
    lapses = order_lapses_at(snap)
    if lapses is None or next_try <= lapses - AUTHZ_EXPIRY_MARGIN:
        return None
    if plan is not None and plan.to_state != snap.state:
        return None
    data = without(snap.data if plan is None else plan.data, ORDER_KEYS | WAIT_KEYS)
    detail = dict(plan.journal.detail) if plan is not None and plan.journal is not None else {}
    detail.update(
        reason="the order's authorization expires before its next try",
        expires=iso(lapses),
        next_try=iso(next_try),
    )
    fields: dict[str, Any] = {
        "to_state": fire(snap.state, Trigger.REORDER, data, by=Mover.POLICY).value,
        "data": data,
        "next_run_at": max(next_try, lapses + timedelta(seconds=1)),
        "journal": JournalNote("transition", Trigger.REORDER.value, sanitize(detail)),
        "cert_key_pem": None,
    }
    if plan is not None:
        return dataclasses.replace(plan, **fields)
    return CommitPlan(
        attempts=0, last_error_class=None, last_error_message=None, last_problem=None, **fields
    )


# States whose order (or certificate) came from the order's account's CA.
CA_BOUND_STATES = frozenset({State.REGISTERED, *ORDERING_STATES, State.INSTALLED, State.RENEW_DUE})


def plan_ca_changed(snap: OrderSnapshot, directory_url: str, now: datetime) -> CommitPlan | None:
    """``ca_changed``, when the order's account belongs to another ACME directory than the
    one this worker talks to (the operator switched ``--staging`` to production, or ``--ca``):
    its order, authorization and ``replaces`` (ARI CertIDs are per CA) mean nothing to this
    CA, whose answer would be a permanent error ("Key ID ... missing expected URL prefix").
    The order starts over from New, which links it to this directory's account; the
    certificate held is served until the new CA's replaces it. None otherwise. The worker
    asks before running a step; in New the step itself links the account."""
    account = snap.account
    if account is None or account.directory_url == directory_url:
        return None
    if State(snap.state) not in CA_BOUND_STATES:
        return None
    data = without(snap.data, ORDER_KEYS | WAIT_KEYS | keys(RenewalTarget, RenewalPlanned))
    detail: dict[str, Any] = {
        "from_directory": account.directory_url,
        "to_directory": directory_url,
    }
    if snap.state == State.FINALIZED.value:
        # Issued by the old CA but not installed yet: after the switch the order is for the
        # new CA's certificate, so that one is left behind; the journal says so.
        detail["dropped_uninstalled_certificate"] = True
    return start_clean(
        fire(snap.state, Trigger.CA_CHANGED, data, by=Mover.POLICY).value,
        data,
        now,
        JournalNote("transition", Trigger.CA_CHANGED.value, sanitize(detail)),
        cert_key_pem=None,
    )


def start_clean(
    to_state: str, data: Mapping[str, Any], now: datetime, journal: JournalNote, **effects: Any
) -> CommitPlan:
    """A move that starts ``to_state`` afresh, due ``now``: no attempts counted, no error
    remembered (the policy's ``ca_changed``, every operator move). ``effects``: the rest of
    the :class:`CommitPlan` (e.g. ``cert_key_pem=None``)."""
    return CommitPlan(
        to_state=to_state,
        data=data,
        next_run_at=now,
        attempts=0,
        last_error_class=None,
        last_error_message=None,
        last_problem=None,
        journal=journal,
        **effects,
    )


def _advance_on_error(
    snap: OrderSnapshot,
    error: AutoTLSError,
    trigger: Trigger,
    *,
    data: Mapping[str, Any],
    run_at: datetime,
    effects: Effects,
) -> CommitPlan:
    to_state = fire(snap.state, trigger, data, by=Mover.POLICY)
    return _plan(
        snap,
        to_state=to_state.value,
        data=data,
        next_run_at=run_at,
        attempts=0 if trigger is not Trigger.FAIL else snap.attempts + 1,
        error=error,
        journal=JournalNote("transition", trigger.value, _error_detail(error)),
        effects=effects,
    )


def plan_error(
    snap: OrderSnapshot,
    error: AutoTLSError,
    now: datetime,
    settings: EngineSettings,
    rng: random.Random,
) -> CommitPlan:
    if error.keep:
        snap = dataclasses.replace(snap, data={**snap.data, **error.keep})
    state = State(snap.state)
    if isinstance(error, AccountUnknownError) and state in (State.REGISTERED, *ORDERING_STATES):
        return _advance_on_error(
            snap,
            error,
            Trigger.ACCOUNT_LOST,
            data=without(snap.data, ORDER_KEYS | WAIT_KEYS),
            run_at=now,
            effects=Effects(account_update=AccountUpdate(None, "unregistered"), cert_key_pem=None),
        )
    if isinstance(error, CertificateUnusableError):
        # Kept for the operator, but no longer what `retry` would install: it never can be.
        data = merge(
            snap.data,
            {"rejected_chain": order_data(snap.data)["chain_pem"]},
            keys(CertificateIssued, ChainDownloaded) | WAIT_KEYS,
        )
        return _advance_on_error(
            snap, error, Trigger.FAIL, data=data, run_at=now, effects=Effects()
        )
    kind = error.error_class
    if kind is ErrorClass.PERMANENT:
        return _advance_on_error(
            snap,
            error,
            Trigger.FAIL,
            data=without(snap.data, WAIT_KEYS),
            run_at=now,
            effects=Effects(),
        )
    if kind is ErrorClass.ORDER_INVALID and state in ORDERING_STATES:
        return _plan_reorder(snap, error, now, settings)
    if kind is ErrorClass.RATE_LIMITED:
        return _stay(snap, error, now + _retry_after(error, settings.rate_limit_default_wait))
    if kind in (ErrorClass.CONFIGURATION, ErrorClass.INTERNAL):
        return _stay(snap, error, now + slow_schedule(snap.attempts + 1, settings))
    # transient, local, or an order-invalid verdict where no order is in flight
    delay = _retry_after(error, backoff(snap.attempts + 1, settings, rng))
    return _stay(snap, error, now + delay)


def slow_schedule(attempt: int, settings: EngineSettings) -> timedelta:
    """Let's Encrypt's retry guidance for failing issuance (1 min, 10 min, 100 min, then
    daily): for trouble that only a fix, not a moment, will cure."""
    schedule = settings.reorder_backoff
    return schedule[min(max(attempt, 1), len(schedule)) - 1]


def _plan_reorder(
    snap: OrderSnapshot, error: AutoTLSError, now: datetime, settings: EngineSettings
) -> CommitPlan:
    window_start = now - settings.validation_window
    recent = [
        moment
        for moment in (_parse(t) for t in order_data(snap.data)["validation_failures"] or [])
        if moment is not None and moment > window_start
    ]
    recent.append(now)
    schedule = settings.reorder_backoff
    run_at = now + schedule[min(len(recent) - 1, len(schedule) - 1)]
    if len(recent) >= settings.validation_budget:
        # Spent: wait until the oldest failure leaves the window (Let's Encrypt allows 5
        # failed authorizations per identifier per hour; we stay well below).
        run_at = max(run_at, min(recent) + settings.validation_window)
    failures = [iso(moment) for moment in recent]
    data = merge(snap.data, {"validation_failures": failures}, ORDER_KEYS | WAIT_KEYS)
    return _advance_on_error(
        snap, error, Trigger.REORDER, data=data, run_at=run_at, effects=Effects(cert_key_pem=None)
    )


def _parse(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def plan_unexpected(
    snap: OrderSnapshot,
    exc: BaseException,
    now: datetime,
    settings: EngineSettings,
    rng: random.Random,
) -> CommitPlan:
    """A bug (an exception that is not an AutoTLSError): class ``internal``, retried on the
    slow schedule for as long as it lasts. Failing the order would page an operator for our
    mistake and throw away what the order holds; a fixed autotls resumes it instead."""
    message = f"internal error in step {snap.state}: {type(exc).__name__}: {exc}"
    return plan_error(snap, InternalError(message), now, settings, rng)
