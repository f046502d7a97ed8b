"""The steps of a certificate's life after issuance: wait for renewal time (the CA's ARI
window, or the backstop fraction of the lifetime), then go back to ordering. Split from
:mod:`autotls.fsm.steps` by job; the same rules hold (design.md rules 2, 3 and 7)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import cast

from autotls.fsm.data import ORDER_KEYS, RenewalPlan, order_data, renewal_plan
from autotls.fsm.errors import PermanentError, RateLimitedError, TransientError
from autotls.fsm.machine import Trigger
from autotls.fsm.outcomes import Advance, Outcome, Wait
from autotls.fsm.ports import Ports
from autotls.fsm.renewal import pick_in_window, plan_renewal
from autotls.fsm.schedule import iso, parse_time
from autotls.persistence.records import OrderSnapshot

# -- Installed: wait for renewal time ---------------------------------------------------------


async def step_installed(snap: OrderSnapshot, ports: Ports) -> Outcome:
    now = ports.clock.now()
    cert = snap.certificate
    if cert is None:
        raise PermanentError("order is Installed but has no certificate record")
    settings = ports.settings
    renewal = renewal_plan(order_data(snap.data)["renewal"])
    if now >= cert.not_after:
        return Advance(
            Trigger.RENEWAL_DUE,
            updates={"replaces": None},
            note={"reason": "expired", "not_after": iso(cert.not_after)},
        )
    supports_ari = await ports.acme.supports_ari()
    if supports_ari and cert.cert_id:
        due_check = renewal["next_ari_check"]
        if due_check is None or parse_time(due_check, "next_ari_check") <= now:
            renewal = await _refresh_ari(renewal, cert.chain_pem, now, ports)
    ari = renewal["ari_time"]
    ari_time = parse_time(ari, "ari_time") if ari else None
    plan = plan_renewal(
        now=now,
        not_before=cert.not_before,
        not_after=cert.not_after,
        ari_time=ari_time,
        emergency_fraction=settings.emergency_fraction,
    )
    if now >= plan.renew_at:
        replaces = cert.cert_id if supports_ari and cert.cert_id else None
        return Advance(
            Trigger.RENEWAL_DUE,
            updates={"replaces": replaces, "renewal": _stored(renewal)},
            note={"reason": plan.reason, "replaces": replaces},
        )
    until = plan.renew_at
    next_check = renewal["next_ari_check"]
    if next_check:
        until = min(until, parse_time(next_check, "next_ari_check"))
    renewal["renew_at"], renewal["reason"] = iso(plan.renew_at), plan.reason
    return Wait(
        until,
        f"renewal at {iso(plan.renew_at)} ({plan.reason})",
        updates={"renewal": _stored(renewal)},
    )


def _stored(plan: RenewalPlan) -> RenewalPlan:
    """The plan as the row keeps it: only the keys that hold something."""
    return cast(RenewalPlan, {k: v for k, v in plan.items() if v is not None})


async def _refresh_ari(
    renewal: RenewalPlan, chain_pem: str, now: datetime, ports: Ports
) -> RenewalPlan:
    settings = ports.settings
    try:
        window = await ports.acme.renewal_info(chain_pem)
    except (TransientError, RateLimitedError) as exc:
        # ARI trouble never endangers the certificate: keep the last window (or the backstop)
        # and ask again later.
        retry = exc.retry_after or settings.ari_min_recheck.total_seconds()
        return {
            **renewal,
            "next_ari_check": iso(_clamped_recheck(now, retry, ports)),
            "ari_error": str(exc),
        }
    if window is None:
        return {**renewal, "next_ari_check": iso(now + settings.ari_max_recheck)}
    previous = renewal["window"]
    current = [iso(window.start), iso(window.end)]
    ari_time = renewal["ari_time"]
    if previous != current or not ari_time:
        ari_time = iso(pick_in_window(window, now, ports.rng))
    return {
        "window": current,
        "ari_time": ari_time,
        "explanation_url": window.explanation_url,
        "next_ari_check": iso(_clamped_recheck(now, window.retry_after, ports)),
    }


def _clamped_recheck(now: datetime, retry_after: float | None, ports: Ports) -> datetime:
    s = ports.settings
    wait = timedelta(seconds=retry_after) if retry_after else timedelta(hours=6)
    return now + max(s.ari_min_recheck, min(wait, s.ari_max_recheck))


# -- RenewDue: back to ordering ----------------------------------------------------------------


async def step_renew_due(snap: OrderSnapshot, ports: Ports) -> Outcome:
    now = ports.clock.now()
    replaces = order_data(snap.data)["replaces"]
    cert = snap.certificate
    if cert is not None and now >= cert.not_after:
        # Never `replaces` an expired certificate: Let's Encrypt answers 404 and the Go
        # client looped forever on it.
        replaces = None
    if replaces and not await ports.acme.supports_ari():
        replaces = None  # RFC 9773: only to a CA that advertises renewalInfo
    return Advance(
        Trigger.START_RENEWAL,
        updates={"replaces": replaces},
        clear=ORDER_KEYS,
        note={"replaces": replaces},
    )
