"""What a step returns (design.md rule 2). A step decides; the worker writes.

* :class:`Advance` -- fire a trigger of the machine, merging ``updates`` into the data.
* :class:`Wait`    -- stay in the state until ``until`` (polling, Retry-After, renewal time,
  or ``until=now`` after recording an *intent* that must be durable before the next call).

Errors are raised as :class:`autotls.fsm.errors.AutoTLSError`; the worker's policy turns them into a
retry, a wait, a re-order or a failure according to their class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from autotls.persistence.records import KEEP, AccountUpdate, Keep, NewAccount, NewCertificate


@dataclass(frozen=True)
class Effects:
    """Store-side changes that ride along with a step's outcome, in the same commit."""

    new_account: NewAccount | None = None
    account_update: AccountUpdate | None = None
    cert_key_pem: bytes | Keep | None = KEEP
    new_certificate: NewCertificate | None = None


@dataclass(frozen=True)
class Advance:
    trigger: str
    updates: Mapping[str, Any] = field(default_factory=dict)
    clear: tuple[str, ...] = ()
    note: Mapping[str, Any] = field(default_factory=dict)  # journal detail (sanitised)
    run_at: datetime | None = None  # default: due immediately
    effects: Effects = field(default_factory=Effects)


@dataclass(frozen=True)
class Wait:
    until: datetime
    reason: str
    updates: Mapping[str, Any] = field(default_factory=dict)
    clear: tuple[str, ...] = ()
    effects: Effects = field(default_factory=Effects)


Outcome = Advance | Wait
