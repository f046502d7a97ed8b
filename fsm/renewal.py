"""When to renew: pure arithmetic over a certificate's dates and the CA's ARI window.

* With ARI (RFC 9773) the CA suggests a window; we pick a uniformly random moment inside
  it, once per distinct window, so a fleet does not renew in lockstep.
* Without ARI, the backstop: renew with 1/3 of the lifetime left (1/2 for certificates
  shorter than 10 days, e.g. Let's Encrypt's 160 h "shortlived" profile).
* Whatever ARI says, renew when less than ``emergency_fraction`` of the lifetime is left.
* An expired certificate is renewed at once, without ``replaces`` and without ARI.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from autotls.fsm.ports import RenewalWindow

SHORT_LIFETIME = timedelta(days=10)


def backstop_time(not_before: datetime, not_after: datetime) -> datetime:
    lifetime = not_after - not_before
    remaining_fraction = 0.5 if lifetime < SHORT_LIFETIME else 1 / 3
    return not_after - lifetime * remaining_fraction


def emergency_time(not_before: datetime, not_after: datetime, fraction: float) -> datetime:
    return not_after - (not_after - not_before) * fraction


def pick_in_window(window: RenewalWindow, now: datetime, rng: random.Random) -> datetime:
    """A uniformly random moment in the window; now when the window is already over."""
    if window.end <= now:
        return now
    start = max(window.start, now)
    span = (window.end - start).total_seconds()
    return start + timedelta(seconds=rng.uniform(0, span))


@dataclass(frozen=True)
class RenewalPlan:
    renew_at: datetime
    reason: str  # "ari" | "backstop" | "emergency" | "expired"


def plan_renewal(
    *,
    now: datetime,
    not_before: datetime,
    not_after: datetime,
    ari_time: datetime | None,
    emergency_fraction: float,
) -> RenewalPlan:
    if now >= not_after:
        return RenewalPlan(now, "expired")
    emergency = emergency_time(not_before, not_after, emergency_fraction)
    if ari_time is not None:
        if ari_time <= emergency:
            return RenewalPlan(ari_time, "ari")
        return RenewalPlan(emergency, "emergency")
    return RenewalPlan(min(backstop_time(not_before, not_after), emergency), "backstop")
