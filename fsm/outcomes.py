"""What a step returns (design.md rule 2). A step decides; the worker writes.

* :class:`Advance` -- fire a trigger of the machine (a declared move, possibly one that stays
  in the state), dropping the ``clear`` keys and merging ``updates`` into the data; journaled.
* :class:`Wait`    -- stay in the state until ``until`` (polling, Retry-After, renewal time,
  or ``until=now`` after recording an *intent* that must be durable before the next call).
  Not journaled: a wait decides nothing, it only records progress within the state, so it
  never drops data (dropping what a state holds is a decision, and a move).

Errors are raised as :class:`autotls.fsm.errors.AutoTLSError`; the worker's policy turns them into a
retry, a wait, a re-order or a failure according to their class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from autotls.fsm.data import Keys, OrderData
from autotls.fsm.machine import Trigger
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
    trigger: Trigger
    updates: OrderData = field(default_factory=lambda: OrderData())
    clear: Keys = frozenset()
    note: Mapping[str, Any] = field(default_factory=dict)  # journal detail (sanitised)
    run_at: datetime | None = None  # default: due immediately
    effects: Effects = field(default_factory=Effects)


@dataclass(frozen=True)
class Wait:
    until: datetime
    reason: str
    updates: OrderData = field(default_factory=lambda: OrderData())
    effects: Effects = field(default_factory=Effects)


Outcome = Advance | Wait
