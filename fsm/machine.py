"""The order machine: every state, trigger and guard, declared once.

Everything that affects which state an order may be in lives here. The worker asks
:func:`fire` for the next state, the diagrams in ``diagrams/`` are rendered from
:data:`TRANSITIONS`, the CLI lists states from :class:`State`, the journal stores
:class:`Trigger` values, and a test fails when the committed diagram drifts from this table.
What an order *carries* in each state is declared in :mod:`autotls.fsm.data`; the guards below
name which of those contributions each state implies.

Theory of operation. An order is one row per peer identity that cycles::

    New -> Registered -> Challenged -> BrokerNotified -> DNSPropagated -> Validated
        -> Finalized -> Installed -> RenewDue -> Registered -> ...

Each state names what has been *achieved* (Registered: the ACME account exists; Challenged:
an ACME order and its DNS-01 challenge exist; BrokerNotified: the broker accepted the value;
DNSPropagated: every authoritative server serves it; Validated: the CA validated it;
Finalized: the CA issued the certificate; Installed: it is verified, stored and served).
The step that *leaves* a state performs the single side effect that achieves the next one.

Besides the happy path, every move the journal can record is declared, including those that
stay where they are: ``registration_held`` places no order while the broker could not dial
the node or the registration delay runs, ``abandon_order`` drops a stored ACME order the CA
made unusable and ``drop_replaces`` orders again without ``replaces`` (all stay in
Registered); ``reorder`` abandons an order in flight; ``txt_timeout`` re-sends the value to
the broker when DNS never showed it; ``account_lost`` re-registers after the CA forgot the
account; ``ca_changed`` starts over with the account of another configured CA (the
certificate held is served until the new CA's replaces it); ``retry_later``
records a classified error after which the order stays and is tried again later; ``fail``
ends in Failed (permanent errors only) and ``corrupt`` sets aside a row that cannot be read.
From Failed an operator may ``retry`` from New, or with ``retry_install`` go straight back to
Finalized when the order holds a certificate the CA already issued (which is never thrown away
for a new order). ``create`` is the move that starts every journal.

Each transition says who may fire it (:class:`Mover`) and whether it recovers from trouble
(``recovery``: the diagrams draw those dashed). Guards check that an advancing move recorded
the data its destination implies (:data:`STATE_REQUIRES`), so a row can never sit in a state
without what that state means.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transitions import EventData, Machine, MachineError

from autotls.fsm import data as d


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


class Trigger(enum.StrEnum):
    """Every move's name, as the journal stores it."""

    CREATE = "create"
    ACCOUNT_READY = "account_ready"
    REGISTRATION_HELD = "registration_held"
    ORDER_PLACED = "order_placed"
    DROP_REPLACES = "drop_replaces"
    ABANDON_ORDER = "abandon_order"
    BROKER_ACCEPTED = "broker_accepted"
    AUTHORIZATION_REUSED = "authorization_reused"
    TXT_VISIBLE = "txt_visible"
    TXT_TIMEOUT = "txt_timeout"
    AUTHORIZATION_VALID = "authorization_valid"
    CERTIFICATE_ISSUED = "certificate_issued"
    CERTIFICATE_INSTALLED = "certificate_installed"
    RENEWAL_DUE = "renewal_due"
    FORCE_RENEWAL = "force_renewal"
    START_RENEWAL = "start_renewal"
    REORDER = "reorder"
    ACCOUNT_LOST = "account_lost"
    CA_CHANGED = "ca_changed"
    RETRY_LATER = "retry_later"
    FAIL = "fail"
    CORRUPT = "corrupt"
    RETRY = "retry"
    RETRY_INSTALL = "retry_install"


class Mover(enum.Enum):
    """Who may fire a trigger."""

    STEP = "step"  # a step returns it (an Advance)
    POLICY = "policy"  # the policy picks it: for a classified error, or before a step runs
    WORKER = "worker"  # the worker, for a row it cannot read
    OPERATOR = "operator"  # a person or the embedding program (CLI, AutoTLS)


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

# What ``data`` must hold for an order to be in a state: the contributions (declared in
# autotls.fsm.data) of the move that enters it. Checked on entry; tests that place rows
# directly into a state use it too.
STATE_CONTRIBUTIONS: Mapping[State, tuple[Any, ...]] = {
    State.CHALLENGED: (d.OrderPlaced, d.AuthorizationFound),
    State.BROKER_NOTIFIED: (d.ChallengeFound, d.BrokerSent),
    State.DNS_PROPAGATED: (d.TxtSeen,),
    State.VALIDATED: (d.AuthorizationValid,),
    State.FINALIZED: (d.CertificateIssued,),
    State.INSTALLED: (d.CertificateInstalled,),
}
STATE_REQUIRES: Mapping[State, tuple[str, ...]] = {
    state: tuple(sorted(d.keys(*contributions)))
    for state, contributions in STATE_CONTRIBUTIONS.items()
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
    trigger: Trigger
    sources: tuple[State, ...]  # empty: the order comes into being
    dest: State | None  # None: the order stays in whichever source state it is in
    doc: str
    by: frozenset[Mover]
    recovery: bool  # recovers from trouble (drawn dashed), rather than making progress

    def edges(self) -> list[tuple[State | None, State]]:
        """(from, to) for each source; ``(None, dest)`` for the creating move."""
        if not self.sources:
            assert self.dest is not None
            return [(None, self.dest)]
        return [(s, s if self.dest is None else self.dest) for s in self.sources]


def _t(
    trigger: Trigger,
    sources: State | Sequence[State],
    dest: State | None,
    doc: str,
    *,
    by: Mover | tuple[Mover, ...] = Mover.STEP,
    recovery: bool = False,
) -> Transition:
    srcs = (sources,) if isinstance(sources, State) else tuple(sources)
    movers = frozenset((by,) if isinstance(by, Mover) else by)
    return Transition(trigger, srcs, dest, doc, movers, recovery)


T = Trigger
TRANSITIONS: tuple[Transition, ...] = (
    _t(T.CREATE, (), State.NEW, "an order for a peer is created", by=Mover.OPERATOR),
    _t(T.ACCOUNT_READY, State.NEW, State.REGISTERED, "ACME account registered or found"),
    _t(
        T.REGISTRATION_HELD,
        State.REGISTERED,
        State.REGISTERED,
        "no order yet: nothing the broker could dial, or the registration delay",
        recovery=True,
    ),
    _t(T.ORDER_PLACED, State.REGISTERED, State.CHALLENGED, "newOrder + its authorization"),
    _t(
        T.DROP_REPLACES,
        State.REGISTERED,
        State.REGISTERED,
        "CA refused `replaces`: order without it",
        recovery=True,
    ),
    _t(
        T.ABANDON_ORDER,
        State.REGISTERED,
        State.REGISTERED,
        "stored order invalid or expired: drop it, order anew",
        recovery=True,
    ),
    _t(T.BROKER_ACCEPTED, State.CHALLENGED, State.BROKER_NOTIFIED, "broker dialed us, stored TXT"),
    _t(
        T.AUTHORIZATION_REUSED,
        State.CHALLENGED,
        State.VALIDATED,
        "CA reused a valid authorization",
    ),
    _t(T.TXT_VISIBLE, State.BROKER_NOTIFIED, State.DNS_PROPAGATED, "all authoritative NS serve it"),
    _t(
        T.TXT_TIMEOUT,
        State.BROKER_NOTIFIED,
        State.CHALLENGED,
        "TXT never appeared: resend",
        recovery=True,
    ),
    _t(T.AUTHORIZATION_VALID, State.DNS_PROPAGATED, State.VALIDATED, "CA validated the challenge"),
    _t(T.CERTIFICATE_ISSUED, State.VALIDATED, State.FINALIZED, "finalized, certificate URL known"),
    _t(T.CERTIFICATE_INSTALLED, State.FINALIZED, State.INSTALLED, "chain verified, stored, served"),
    _t(T.RENEWAL_DUE, State.INSTALLED, State.RENEW_DUE, "ARI window / lifetime backstop"),
    _t(
        T.FORCE_RENEWAL,
        State.INSTALLED,
        State.RENEW_DUE,
        "operator asked to renew now",
        by=Mover.OPERATOR,
    ),
    _t(T.START_RENEWAL, State.RENEW_DUE, State.REGISTERED, "order again (replaces when allowed)"),
    _t(
        T.REORDER,
        ORDERING_STATES,
        State.REGISTERED,
        "order invalid or expired: a new one",
        by=(Mover.STEP, Mover.POLICY),
        recovery=True,
    ),
    _t(
        T.ACCOUNT_LOST,
        (State.REGISTERED, *ORDERING_STATES),
        State.NEW,
        "CA does not know the account: register again",
        by=Mover.POLICY,
        recovery=True,
    ),
    _t(
        T.CA_CHANGED,
        (State.REGISTERED, *ORDERING_STATES, State.INSTALLED, State.RENEW_DUE),
        State.NEW,
        "the configured CA is not the account's: order anew from that CA",
        by=Mover.POLICY,
        recovery=True,
    ),
    _t(
        T.RETRY_LATER,
        ACTIVE_STATES,
        None,
        "classified error, stay and try again later",
        by=Mover.POLICY,
        recovery=True,
    ),
    _t(T.FAIL, ACTIVE_STATES, State.FAILED, "permanent error", by=Mover.POLICY, recovery=True),
    _t(
        T.CORRUPT,
        ACTIVE_STATES,
        State.FAILED,
        "row cannot be read: set aside",
        by=Mover.WORKER,
        recovery=True,
    ),
    _t(
        T.RETRY,
        State.FAILED,
        State.NEW,
        "operator retries a failed order",
        by=Mover.OPERATOR,
        recovery=True,
    ),
    _t(
        T.RETRY_INSTALL,
        (State.FAILED, State.FINALIZED),
        State.FINALIZED,
        "operator retries installing the issued certificate",
        by=Mover.OPERATOR,
        recovery=True,
    ),
)
del T

TRANSITION_OF: Mapping[Trigger, Transition] = {t.trigger: t for t in TRANSITIONS}
assert set(TRANSITION_OF) == set(Trigger), "every trigger is declared exactly once"


class InvalidTransitionError(Exception):
    """A step or operator asked for a move the machine does not declare."""


def _guard(event: EventData) -> bool:
    data: Mapping[str, Any] = event.kwargs["data"]
    if event.transition is None or event.transition.dest is None:
        return True  # stays: the state it is in already holds what it implies
    dest = State(event.transition.dest)
    return all(data.get(key) not in (None, "") for key in STATE_REQUIRES.get(dest, ()))


# One shared machine without models: ``fire`` attaches a throw-away probe for one trigger
# and removes it again, so nothing keeps models alive and no loaded state is overwritten
# by an ``initial`` (both pitfalls of ``transitions``). The creating move has no source and
# is never fired: the store records it when it inserts the row.
_MACHINE = Machine(
    model=None,
    states=[s.value for s in State],
    transitions=[
        {
            "trigger": t.trigger.value,
            "source": [s.value for s in t.sources],
            "dest": t.dest.value if t.dest is not None else None,
            "conditions": [_guard],
        }
        for t in TRANSITIONS
        if t.sources
    ],
    initial=None,
    auto_transitions=False,
    send_event=True,
)


class _Probe:
    state: str


def _trigger(value: str | Trigger) -> Trigger:
    try:
        return Trigger(value)
    except ValueError:
        raise InvalidTransitionError(f"unknown trigger {value!r}") from None


def fire(
    state: str | State, trigger: str | Trigger, data: Mapping[str, Any], *, by: Mover
) -> State:
    """The state an order in ``state`` moves to on ``trigger`` with ``data`` (after the move),
    when ``by`` may fire it.

    Raises :class:`InvalidTransitionError` naming what is wrong: an unknown state or trigger,
    a trigger that ``by`` may not fire or that is not allowed from that state, or data missing
    what the destination implies."""
    try:
        source = State(state)
    except ValueError:
        raise InvalidTransitionError(f"unknown state {state!r}") from None
    move = TRANSITION_OF[_trigger(trigger)]
    if by not in move.by:
        whose = " or ".join(sorted(m.value for m in move.by))
        raise InvalidTransitionError(
            f"{move.trigger.value!r} is a move of the {whose}, not of the {by.value}"
        )
    probe = _Probe()
    _MACHINE.add_model(probe, initial=source.value)
    try:
        try:
            moved = probe.trigger(move.trigger.value, data=data)  # type: ignore[attr-defined]
        except MachineError:
            raise InvalidTransitionError(
                f"{move.trigger.value!r} is not allowed from {source.value}"
            ) from None
        if not moved:
            dest = destination(source, move.trigger)
            missing = [k for k in STATE_REQUIRES.get(dest, ()) if data.get(k) in (None, "")]
            raise InvalidTransitionError(
                f"{move.trigger.value!r} from {source.value} to {dest.value} lacks data: "
                + ", ".join(missing)
            )
        return State(str(probe.state))
    finally:
        _MACHINE.remove_model(probe)


def destination(source: State, trigger: str | Trigger) -> State:
    move = TRANSITION_OF[_trigger(trigger)]
    if source not in move.sources:
        raise InvalidTransitionError(f"{move.trigger.value!r} is not allowed from {source.value}")
    return source if move.dest is None else move.dest


def triggers_from(state: State) -> list[Trigger]:
    return [t.trigger for t in TRANSITIONS if state in t.sources]


def is_valid_path(moves: Sequence[tuple[str | None, str, str]]) -> bool:
    """True when ``(from, to, trigger)`` moves, in order, form a walk through the machine
    that starts with a creating move (from ``None``) and where each move leaves the previous
    one's destination by a declared transition."""
    current: State | None = None
    for index, (src, dst, trigger) in enumerate(moves):
        try:
            move = TRANSITION_OF[Trigger(trigger)]
            to = State(dst)
        except ValueError:
            return False
        if index == 0:
            if src is not None or move.sources or move.dest is not to:
                return False
            current = to
            continue
        if src is None or src != current:
            return False
        try:
            if destination(State(src), move.trigger) is not to:
                return False
        except (InvalidTransitionError, ValueError):
            return False
        current = to
    return True
