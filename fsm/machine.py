"""The order machine: every state, trigger and guard, declared once.

Everything that affects which state an order may be in lives here. The worker asks
:func:`fire` for the next state, the diagrams in ``diagrams/`` are rendered from
:data:`TRANSITIONS`, the CLI lists states from :class:`State`, and a test fails when the
committed diagram drifts from this table.

Theory of operation. An order is one row per peer identity that cycles::

    New -> Registered -> Challenged -> BrokerNotified -> DNSPropagated -> Validated
        -> Finalized -> Installed -> RenewDue -> Registered -> ...

Each state names what has been *achieved* (Registered: the ACME account exists; Challenged:
an ACME order and its DNS-01 challenge exist; BrokerNotified: the broker accepted the value;
DNSPropagated: every authoritative server serves it; Validated: the CA validated it;
Finalized: the CA issued the certificate; Installed: it is verified, stored and served).
The step that *leaves* a state performs the single side effect that achieves the next one.

Besides the happy path: ``reorder`` abandons an ACME order the CA made invalid (or that
expired) and places a new one; ``txt_timeout`` re-sends the value to the broker when DNS
never showed it; ``account_lost`` re-registers after the CA forgot the account; ``fail``
ends in Failed (permanent errors only), from which an operator may ``retry``: from New, or
with ``retry_install`` straight back to Finalized when the order holds a certificate the CA
already issued (which is never thrown away for a new order).

Guards check that an advancing step recorded the data its destination implies
(:data:`STATE_REQUIRES`), so a row can never sit in a state without what that state means.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transitions import EventData, Machine, MachineError


class State(enum.StrEnum):
    NEW = "New"
    REGISTERED = "Registered"
    CHALLENGED = "Challenged"
    BROKER_NOTIFIED = "BrokerNotified"
    DNS_PROPAGATED = "DNSPropagated"
    VALIDATED = "Validated"
    FINALIZED = "Finalized"
    INSTALLED = "Installed"
    RENEW_DUE = "RenewDue"
    FAILED = "Failed"


TERMINAL_STATES = frozenset({State.FAILED})
ACTIVE_STATES = tuple(s for s in State if s not in TERMINAL_STATES)
# States between placing an ACME order and holding its certificate.
ORDERING_STATES = (
    State.CHALLENGED,
    State.BROKER_NOTIFIED,
    State.DNS_PROPAGATED,
    State.VALIDATED,
    State.FINALIZED,
)

# The states of a straight issuance, in order.
ISSUANCE_PATH = (
    State.NEW,
    State.REGISTERED,
    State.CHALLENGED,
    State.BROKER_NOTIFIED,
    State.DNS_PROPAGATED,
    State.VALIDATED,
    State.FINALIZED,
    State.INSTALLED,
)

# What ``data`` must hold for an order to be in a state (checked on entry, used by tests
# that place rows directly into a state).
STATE_REQUIRES: Mapping[State, tuple[str, ...]] = {
    State.CHALLENGED: (
        "order_url",
        "authz_url",
        "challenge_url",
        "finalize_url",
        "token",
        "dns_value",
        "authz_expires",
    ),
    State.BROKER_NOTIFIED: ("broker_sent_at",),
    State.DNS_PROPAGATED: ("txt_seen_at",),
    State.VALIDATED: ("authz_valid_at",),
    State.FINALIZED: ("certificate_url",),
    State.INSTALLED: ("installed_at",),
}


def requirements(state: State) -> tuple[str, ...]:
    """Every data key an order in ``state`` carries (its own and those of earlier steps)."""
    chain = list(ISSUANCE_PATH[ISSUANCE_PATH.index(State.CHALLENGED) : -1])
    if state not in chain:
        return STATE_REQUIRES.get(state, ())
    keys: list[str] = []
    for s in chain[: chain.index(state) + 1]:
        keys.extend(STATE_REQUIRES[s])
    return tuple(keys)


@dataclass(frozen=True)
class Transition:
    trigger: str
    sources: tuple[State, ...]
    dest: State
    doc: str


def _t(trigger: str, sources: State | Sequence[State], dest: State, doc: str) -> Transition:
    srcs = (sources,) if isinstance(sources, State) else tuple(sources)
    return Transition(trigger, srcs, dest, doc)


TRANSITIONS: tuple[Transition, ...] = (
    _t("account_ready", State.NEW, State.REGISTERED, "ACME account registered or found"),
    _t("order_placed", State.REGISTERED, State.CHALLENGED, "newOrder + its dns-01 challenge"),
    _t("broker_accepted", State.CHALLENGED, State.BROKER_NOTIFIED, "broker dialed us, stored TXT"),
    _t(
        "authorization_reused",
        State.CHALLENGED,
        State.VALIDATED,
        "CA reused a valid authorization",
    ),
    _t("txt_visible", State.BROKER_NOTIFIED, State.DNS_PROPAGATED, "all authoritative NS serve it"),
    _t("txt_timeout", State.BROKER_NOTIFIED, State.CHALLENGED, "TXT never appeared: resend"),
    _t("authorization_valid", State.DNS_PROPAGATED, State.VALIDATED, "CA validated the challenge"),
    _t("certificate_issued", State.VALIDATED, State.FINALIZED, "finalized, certificate URL known"),
    _t("certificate_installed", State.FINALIZED, State.INSTALLED, "chain verified, stored, served"),
    _t("renewal_due", State.INSTALLED, State.RENEW_DUE, "ARI window / lifetime backstop"),
    _t("force_renewal", State.INSTALLED, State.RENEW_DUE, "operator asked to renew now"),
    _t("start_renewal", State.RENEW_DUE, State.REGISTERED, "order again (replaces when allowed)"),
    _t("reorder", ORDERING_STATES, State.REGISTERED, "order invalid or expired: a new one"),
    _t(
        "account_lost",
        (State.REGISTERED, *ORDERING_STATES),
        State.NEW,
        "CA does not know the account: register again",
    ),
    _t("fail", ACTIVE_STATES, State.FAILED, "permanent error"),
    _t("retry", State.FAILED, State.NEW, "operator retries a failed order"),
    _t(
        "retry_install",
        (State.FAILED, State.FINALIZED),
        State.FINALIZED,
        "operator retries installing the issued certificate",
    ),
)

TRIGGERS: frozenset[str] = frozenset(t.trigger for t in TRANSITIONS)
# Triggers only an operator may fire (the CLI); steps never return them.
OPERATOR_TRIGGERS = frozenset({"retry", "retry_install", "force_renewal"})


class InvalidTransitionError(Exception):
    """A step or operator asked for a move the machine does not declare."""


def _guard(event: EventData) -> bool:
    data: Mapping[str, Any] = event.kwargs["data"]
    if event.transition is None or event.transition.dest is None:
        return False
    dest = State(event.transition.dest)
    return all(data.get(key) not in (None, "") for key in STATE_REQUIRES.get(dest, ()))


# One shared machine without models: ``fire`` attaches a throw-away probe for one trigger
# and removes it again, so nothing keeps models alive and no loaded state is overwritten
# by an ``initial`` (both pitfalls of ``transitions``).
_MACHINE = Machine(
    model=None,
    states=[s.value for s in State],
    transitions=[
        {
            "trigger": t.trigger,
            "source": [s.value for s in t.sources],
            "dest": t.dest.value,
            "conditions": [_guard],
        }
        for t in TRANSITIONS
    ],
    initial=None,
    auto_transitions=False,
    send_event=True,
)


class _Probe:
    state: str


def fire(state: str | State, trigger: str, data: Mapping[str, Any]) -> State:
    """The state an order in ``state`` moves to on ``trigger`` with ``data`` (after the move).

    Raises :class:`InvalidTransitionError` naming what is wrong: an unknown state or trigger,
    a trigger not allowed from that state, or data missing what the destination implies."""
    try:
        source = State(state)
    except ValueError:
        raise InvalidTransitionError(f"unknown state {state!r}") from None
    if trigger not in TRIGGERS:
        raise InvalidTransitionError(f"unknown trigger {trigger!r}")
    probe = _Probe()
    _MACHINE.add_model(probe, initial=source.value)
    try:
        try:
            moved = probe.trigger(trigger, data=data)  # type: ignore[attr-defined]
        except MachineError:
            raise InvalidTransitionError(
                f"{trigger!r} is not allowed from {source.value}"
            ) from None
        if not moved:
            dest = destination(source, trigger)
            missing = [k for k in STATE_REQUIRES.get(dest, ()) if data.get(k) in (None, "")]
            raise InvalidTransitionError(
                f"{trigger!r} from {source.value} to {dest.value} lacks data: {', '.join(missing)}"
            )
        return State(str(probe.state))
    finally:
        _MACHINE.remove_model(probe)


def destination(source: State, trigger: str) -> State:
    for t in TRANSITIONS:
        if t.trigger == trigger and source in t.sources:
            return t.dest
    raise InvalidTransitionError(f"{trigger!r} is not allowed from {source.value}")


def triggers_from(state: State) -> list[str]:
    return [t.trigger for t in TRANSITIONS if state in t.sources]


def is_valid_path(moves: Sequence[tuple[str | None, str, str]]) -> bool:
    """True when ``(from, to, trigger)`` moves, in order, form a walk through the machine
    that starts at creation (from ``None``) and where each move leaves the previous one's
    destination."""
    current: State | None = None
    for index, (src, dst, trigger) in enumerate(moves):
        if index == 0:
            if src is not None or trigger != "create":
                return False
            current = State(dst)
            continue
        if src is None or src != current:
            return False
        try:
            if destination(State(src), trigger) != State(dst):
                return False
        except (InvalidTransitionError, ValueError):
            return False
        current = State(dst)
    return True
