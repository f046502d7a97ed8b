"""What happens to an order from outside the worker, as moves of the same machine: creating
it (``create``), the CLI's and the facade's ``retry`` / ``retry_install`` and ``renew --force``
(``force_renewal``, which records a revocation on the certificate's row when asked), and the
order a starting process resumes. Each is validated by :func:`autotls.fsm.machine.fire` as a
move of the operator, fenced like a worker's commit, and journaled with the actor's name; a
move refused because of the order's state raises ``OrderStateError``, one refused because a
worker holds the order raises ``OrderBusyError``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from autotls.fsm.data import ORDER_KEYS, WAIT_KEYS, Keys, ValidationBudget, keys, order_data
from autotls.fsm.machine import Mover, State, Trigger, fire
from autotls.fsm.policy import start_clean
from autotls.persistence.errors import ActiveOrderExistsError, OrderBusyError, OrderStateError
from autotls.persistence.records import CommitPlan, JournalNote, OrderSnapshot, Revocation
from autotls.persistence.store import Store


def _plan(
    snap: OrderSnapshot,
    trigger: Trigger,
    now: datetime,
    *,
    clear: Keys,
    detail: Mapping[str, Any] | None = None,
) -> CommitPlan:
    # What a step wrote about its own wait stops being true when an operator moves the order.
    data = {k: v for k, v in snap.data.items() if k not in clear | WAIT_KEYS}
    to_state = fire(snap.state, trigger, data, by=Mover.OPERATOR)
    note = {"previous_error": snap.last_error_message, **(detail or {})}
    return start_clean(to_state.value, data, now, JournalNote("operator", trigger.value, note))


def holds_issued_certificate(snap: OrderSnapshot) -> bool:
    """The CA already issued this order's certificate and we hold what installing it needs:
    its URL (or its downloaded chain) and the key it was issued for."""
    data = order_data(snap.data)
    return bool(data["certificate_url"] or data["chain_pem"]) and (snap.cert_key_pem is not None)


def _retry_plan(snap: OrderSnapshot, now: datetime) -> CommitPlan:
    if snap.state == State.FINALIZED.value or holds_issued_certificate(snap):
        # Install what the CA issued (from the stored chain, or downloaded again): a new
        # order would burn one of Let's Encrypt's 5 duplicate certificates a week.
        return _plan(snap, Trigger.RETRY_INSTALL, now, clear=frozenset())
    return _plan(snap, Trigger.RETRY, now, clear=ORDER_KEYS | keys(ValidationBudget))


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
    store: Store,
    order_id: int,
    *,
    now: datetime,
    actor: str,
    revoked: bool = False,
    reason: str | None = None,
) -> OrderSnapshot:
    """Installed -> RenewDue now (``replaces`` the current certificate when ARI allows).

    ``revoked`` says the current certificate was just revoked (``reason``: the RFC 5280 name,
    if one was given): the revocation is recorded on the certificate's row in the same commit,
    and a running AutoTLS stops advertising its forge addresses (the certificate is still
    served until the new one arrives)."""

    def build(snap: OrderSnapshot) -> CommitPlan:
        cert = snap.certificate
        replaces = cert.cert_id if cert is not None and cert.not_after > now else None
        why = "revoked" if revoked and cert is not None else "forced"
        detail: dict[str, Any] = {"reason": why}
        if why == "revoked" and cert is not None:
            detail.update(serial=cert.serial, revocation_reason=reason)
        plan = _plan(snap, Trigger.FORCE_RENEWAL, now, clear=frozenset(), detail=detail)
        return replace(
            plan,
            data={**plan.data, "replaces": replaces},
            revocation=(
                Revocation(cert.id, reason) if why == "revoked" and cert is not None else None
            ),
        )

    return await store.operator_commit(
        order_id, allowed_states={State.INSTALLED.value}, build=build, now=now, actor=actor
    )


async def create_order(
    store: Store, peer_id: str, identifier: str, *, now: datetime, actor: str = "operator"
) -> OrderSnapshot:
    """A new order for ``peer_id``, in New, due now: the machine's creating move (the first
    entry of its journal). Raises ``ActiveOrderExistsError`` when the peer has one."""
    return await store.create_order(
        peer_id,
        identifier,
        initial_state=State.NEW.value,
        trigger=Trigger.CREATE.value,
        now=now,
        actor=actor,
    )


async def resume_or_create(
    store: Store, peer_id: str, identifier: str, *, now: datetime, actor: str
) -> OrderSnapshot:
    """The order a process serving ``peer_id`` works on: the active one; else a failed one
    holding what the CA issued, retried (installed, never ordered again); else a new one.
    Safe when several processes of the peer start at once."""
    active = await store.active_order(peer_id)
    if active is not None:
        return active
    latest = await store.latest_order(peer_id)
    if latest is not None and holds_issued_certificate(latest):
        try:
            return await retry(store, latest.id, now=now, actor=actor)
        except (OrderBusyError, OrderStateError, ActiveOrderExistsError):
            active = await store.active_order(peer_id)
            if active is not None:
                return active
    try:
        return await create_order(store, peer_id, identifier, now=now, actor=actor)
    except ActiveOrderExistsError:  # another process of this peer just made it
        active = await store.active_order(peer_id)
        assert active is not None
        return active
