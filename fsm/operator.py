"""What an operator may do to an order (the CLI's ``renew --force`` and ``retry``), as moves
of the same machine: validated by :func:`autotls.fsm.machine.fire`, fenced like a worker's commit,
journaled with the actor's name."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from autotls.fsm.machine import State, fire
from autotls.fsm.steps import ORDER_KEYS
from autotls.persistence.records import CommitPlan, JournalNote, OrderSnapshot
from autotls.persistence.store import Store

# What a step wrote about its own wait or its own trouble stops being true when an operator
# moves the order ("unexpected_errors": rows written before errors had class ``internal``).
TRANSIENT_KEYS = ("waiting_for", "unexpected_errors")


def _plan(
    snap: OrderSnapshot, trigger: str, now: datetime, *, clear: tuple[str, ...]
) -> CommitPlan:
    dropped = (*clear, *TRANSIENT_KEYS)
    data = {k: v for k, v in snap.data.items() if k not in dropped}
    to_state = fire(snap.state, trigger, data)
    return CommitPlan(
        to_state=to_state.value,
        data=data,
        next_run_at=now,
        attempts=0,
        last_error_class=None,
        last_error_message=None,
        last_problem=None,
        journal=JournalNote("operator", trigger, {"previous_error": snap.last_error_message}),
    )


def holds_issued_certificate(snap: OrderSnapshot) -> bool:
    """The CA already issued this order's certificate and we hold what installing it needs:
    its URL (or its downloaded chain) and the key it was issued for."""
    return bool(snap.data.get("certificate_url") or snap.data.get("chain_pem")) and (
        snap.cert_key_pem is not None
    )


def _retry_plan(snap: OrderSnapshot, now: datetime) -> CommitPlan:
    if snap.state == State.FINALIZED.value or holds_issued_certificate(snap):
        # Install what the CA issued (from the stored chain, or downloaded again): a new
        # order would burn one of Let's Encrypt's 5 duplicate certificates a week.
        return _plan(snap, "retry_install", now, clear=())
    return _plan(snap, "retry", now, clear=(*ORDER_KEYS, "validation_failures"))


async def retry(store: Store, order_id: int, *, now: datetime, actor: str) -> OrderSnapshot:
    """Try a stuck order again now.

    * Failed, holding an issued certificate -> Finalized (``retry_install``): the certificate
      is verified and installed again, never ordered again.
    * Failed otherwise -> New (``retry``): start over; the account is kept, the failed ACME
      order is dropped.
    * Finalized (waiting, e.g. for a trust-roots fix) -> due now (``retry_install``)."""
    return await store.operator_commit(
        order_id,
        allowed_states={State.FAILED.value, State.FINALIZED.value},
        build=lambda snap: _retry_plan(snap, now),
        now=now,
        actor=actor,
    )


async def force_renewal(
    store: Store, order_id: int, *, now: datetime, actor: str, revoked: bool = False
) -> OrderSnapshot:
    """Installed -> RenewDue now (``replaces`` the current certificate when ARI allows).

    ``revoked`` says the current certificate was just revoked: its serial is recorded as
    ``revoked_serial``, and a running AutoTLS stops advertising its forge addresses when its
    worker takes the renewal (the certificate is still served until the new one arrives)."""

    def build(snap: OrderSnapshot) -> CommitPlan:
        plan = _plan(snap, "force_renewal", now, clear=())
        cert = snap.certificate
        replaces = cert.cert_id if cert is not None and cert.not_after > now else None
        data = {**plan.data, "replaces": replaces, "renewal_reason": "forced"}
        if revoked and cert is not None:
            data.update(renewal_reason="revoked", revoked_serial=cert.serial)
        return replace(plan, data=data)

    return await store.operator_commit(
        order_id, allowed_states={State.INSTALLED.value}, build=build, now=now, actor=actor
    )
