"""Named fault points (design.md rule 12).

The worker passes three points around every step::

    claim -> [before_effect] -> step (the side effect) -> [after_effect] -> commit -> [after_commit]

A :class:`FaultPlan` says where to crash: ``after_effect@Validated`` (every time) or
``after_effect@Validated#1`` (only the first time), with the action ``raise`` (in-process:
an :class:`InjectedCrash`, a ``BaseException`` nothing in the engine catches, so the process
"dies" with its lease held) or ``kill`` (a real ``SIGKILL`` of the running process).

Tests set plans directly; a :class:`~autotls.fsm.worker.Worker` built without one reads
``AUTOTLS_FAULTS`` (so does ``autotls run``, through the facade), e.g.
``AUTOTLS_FAULTS="after_effect@Finalized#1:kill,before_effect@New:raise"``.
"""

from __future__ import annotations

import enum
import os
import signal
from collections import Counter
from dataclasses import dataclass

from autotls.fsm.errors import ConfigurationError

ENV_VAR = "AUTOTLS_FAULTS"


class FaultPoint(enum.StrEnum):
    BEFORE_EFFECT = "before_effect"
    AFTER_EFFECT = "after_effect"
    AFTER_COMMIT = "after_commit"


class InjectedCrash(BaseException):
    """Raised at a fault point to simulate the process dying there."""


@dataclass(frozen=True)
class FaultRule:
    point: FaultPoint
    state: str | None  # None: any state
    occurrence: int | None  # None: every time; n: only the n-th time (1-based)
    action: str  # "raise" | "kill"

    @classmethod
    def parse(cls, text: str) -> FaultRule:
        spec, _, action = text.strip().partition(":")
        action = action or "raise"
        if action not in ("raise", "kill"):
            raise ValueError(f"fault action must be raise or kill, not {action!r}")
        spec, _, nth = spec.partition("#")
        point, _, state = spec.partition("@")
        try:
            fault_point = FaultPoint(point)
        except ValueError:
            known = ", ".join(p.value for p in FaultPoint)
            raise ValueError(f"unknown fault point {point!r} (known: {known})") from None
        return cls(fault_point, state or None, int(nth) if nth else None, action)


class FaultPlan:
    def __init__(self, rules: list[FaultRule] | None = None) -> None:
        self.rules = list(rules or [])
        self.seen: Counter[tuple[FaultPoint, str]] = Counter()
        self.fired: list[tuple[FaultPoint, str]] = []

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        return cls([FaultRule.parse(part) for part in text.split(",") if part.strip()])

    @classmethod
    def from_env(cls) -> FaultPlan:
        """The plan in ``AUTOTLS_FAULTS`` (empty when unset): every worker reads it, so any
        worker process (``autotls run`` included) can be crashed at a named point."""
        text = os.environ.get(ENV_VAR, "")
        try:
            return cls.parse(text)
        except ValueError as exc:
            raise ConfigurationError(f"{ENV_VAR}={text!r}: {exc}") from None

    def hit(self, point: FaultPoint, state: str) -> None:
        self.seen[(point, state)] += 1
        count = self.seen[(point, state)]
        for rule in self.rules:
            if rule.point is not point or (rule.state is not None and rule.state != state):
                continue
            if rule.occurrence is not None and rule.occurrence != count:
                continue
            self.fired.append((point, state))
            if rule.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedCrash(f"{point.value}@{state}#{count}")
