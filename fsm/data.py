"""What an order carries: the one declaration of the ``data`` column, key by key.

An order's ``data`` is a JSON object. Each step contributes a few keys, declared here once as a
:class:`~typing.TypedDict` named after what the step achieved; :class:`OrderData` is all of
them together, and the steps, the policy and the operator moves read and write the column only
through it, so ``mypy --strict`` refuses a misspelt key or a value of the wrong type:

* writes are ``OrderData`` literals (``updates={"txt_resends": 1}``);
* reads index the view :func:`order_data` returns (``data["order_url"]``), in which every
  declared key is present, ``None`` where the row holds none. (mypy lets ``.get()`` take any
  key, as PEP 589 allows, so the engine never reads with ``.get()``.) An absent key and a
  ``None`` mean the same, which is why every value type admits ``None``.

What an order carries in each state, beyond what the states before it on the issuance path
left; the machine's guards require the contributions before the ``|``:

==============  ==========================================================================
New             | nothing of an ACME order (see below for what outlives one)
Registered      | ``RegistrationHeld`` while no order may be placed, ``OrderRequested``,
                then ``OrderPlaced`` ``OrderLifetime``
Challenged      ``OrderPlaced``, ``AuthorizationFound`` | ``ChallengeFound`` (a pending
                authorization; a valid one needs no challenge), ``OrderLifetime``,
                ``TxtResent`` after a ``txt_timeout``
BrokerNotified  ``ChallengeFound``, ``BrokerSent`` |
DNSPropagated   ``TxtSeen`` | ``ChallengeAnswered`` and ``CsrRecorded`` (with the answer)
Validated       ``AuthorizationValid`` | ``CsrRecorded`` (a reused authorization's)
Finalized       ``CertificateIssued`` | ``ChainDownloaded``
Installed       ``CertificateInstalled`` | ``RenewalPlanned``
RenewDue        | ``RenewalTarget``
Failed          | ``ChainRejected`` (an issued chain that can never be installed)
==============  ==========================================================================

:class:`ValidationBudget` outlives ACME orders (it is dropped by an operator's ``retry``);
:class:`WaitNote` is written by every wait and dropped by every move.

Everything else is derived from these declarations, never listed again:

* what an order in each state must hold (the machine's guards,
  :data:`autotls.fsm.machine.STATE_REQUIRES`, name the contributions each state implies);
* :data:`ORDER_KEYS`, what belongs to one ACME order and goes when the order is abandoned,
  re-ordered, lost with the account, or retried from the start;
* :data:`WAIT_KEYS`, what a step wrote about its own wait, which a move makes untrue.

What is *not* here: facts about a certificate (serial, validity, revocation) live in its
``certificates`` row; keys (account, certificate) live in their own columns, never in ``data``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, TypedDict, cast

# -- one ACME order, from intent to chain ----------------------------------------------------


class NewOrderIntent(TypedDict):
    """The newOrder a step is about to send, recorded first (intent ahead): a replay after a
    crash must be the identical request."""

    request: str  # sha256 of the canonical request
    at: str
    identifier: str
    profile: str | None
    replaces: str | None


class OrderRequested(TypedDict, total=False):
    """Registered, before newOrder."""

    new_order_intent: NewOrderIntent | None


class OrderPlaced(TypedDict, total=False):
    """Registered, the moment newOrder answered: Let's Encrypt keeps no order list per
    account, so the URL is the only way back to the order."""

    order_url: str | None


class OrderLifetime(TypedDict, total=False):
    """Registered: when the CA drops the order, if it said (no wait may outlive the order:
    :func:`autotls.fsm.policy.plan_lapsed`)."""

    order_expires: str | None


class RegistrationHold(enum.StrEnum):
    """Why no ACME order is placed yet: no authorization clock is started for a node the
    broker could not dial back (protocol.md §4), nor before the registration delay is over."""

    NOT_DIALABLE = "not_dialable"  # no address the broker could dial
    REGISTRATION_DELAY = "registration_delay"  # the node has not been up long enough


class RegistrationHeld(TypedDict, total=False):
    """Registered, before newOrder: why no order may be placed yet (no address the broker
    could dial, the registration delay). The hold is journaled when it begins or its cause
    changes, not at every check."""

    held_because: str | None  # a RegistrationHold value


class AuthorizationFound(TypedDict, total=False):
    """Registered -> Challenged: the order's one authorization."""

    authz_url: str | None
    authz_expires: str | None
    authz_status: str | None  # "valid": the CA reused an authorization, nothing to publish


class ChallengeFound(TypedDict, total=False):
    """Registered -> Challenged, for a pending authorization: its dns-01 challenge. A valid
    authorization needs none (Boulder lists only the challenge that validated it, which may
    be of a type we do not use); BrokerNotified and the states after it imply one."""

    challenge_url: str | None
    dns_value: str | None  # the TXT value the broker publishes


class BrokerSent(TypedDict, total=False):
    """Challenged -> BrokerNotified: the broker stored the value; how long DNS may take."""

    broker_sent_at: str | None
    txt_deadline: str | None


class TxtResent(TypedDict, total=False):
    """BrokerNotified -> Challenged (``txt_timeout``): how often the value was sent again."""

    txt_resends: int | None


class TxtSeen(TypedDict, total=False):
    """BrokerNotified -> DNSPropagated: every authoritative server serves the value; and the
    fence of the claim that saw it: the next claim (fence + 1) is the first that may answer
    the challenge, so it answers without asking the CA first. Any later claim might follow
    one that answered and crashed, and asks the CA before answering."""

    txt_seen_at: str | None
    txt_seen_fence: int | None


class ChallengeAnswered(TypedDict, total=False):
    """DNSPropagated: the challenge was answered (never twice)."""

    answered_at: str | None


class AuthorizationValid(TypedDict, total=False):
    """DNSPropagated (or Challenged, reused) -> Validated."""

    authz_valid_at: str | None


class CsrRecorded(TypedDict, total=False):
    """DNSPropagated, with the answer (or Validated, for a reused authorization), before
    finalize: the CSR of the key in ``orders.cert_key_pem``."""

    csr_der: str | None  # base64


class CertificateIssued(TypedDict, total=False):
    """Validated -> Finalized."""

    certificate_url: str | None


class ChainDownloaded(TypedDict, total=False):
    """Finalized, before verification: what the CA issued is never thrown away."""

    chain_pem: str | None


class ChainRejected(TypedDict, total=False):
    """Failed: an issued chain that can never be installed (wrong name or key), kept for the
    operator but no longer what ``retry`` would install."""

    rejected_chain: str | None


# -- the order's life across ACME orders ------------------------------------------------------


class CertificateInstalled(TypedDict, total=False):
    """Finalized -> Installed (the certificate itself is in the ``certificates`` row)."""

    installed_at: str | None


class RenewalPlan(TypedDict, total=False):
    """When to renew, and why: the CA's ARI window and the moment picked in it."""

    window: list[str] | None  # [start, end]
    ari_time: str | None
    explanation_url: str | None
    next_ari_check: str | None
    ari_error: str | None
    renew_at: str | None
    reason: str | None


class RenewalPlanned(TypedDict, total=False):
    """Installed: the renewal plan (None once a new certificate starts its own)."""

    renewal: RenewalPlan | None


class RenewalTarget(TypedDict, total=False):
    """Installed -> RenewDue -> Registered: the CertID the next order ``replaces``."""

    replaces: str | None


class ValidationBudget(TypedDict, total=False):
    """Failed validations of the last window (Let's Encrypt limits them per identifier)."""

    validation_failures: list[str] | None


class WaitNote(TypedDict, total=False):
    """Why the order waits (``autotls status`` shows it); any move makes it untrue."""

    waiting_for: str | None


class OrderData(
    RegistrationHeld,
    OrderRequested,
    OrderPlaced,
    OrderLifetime,
    AuthorizationFound,
    ChallengeFound,
    BrokerSent,
    TxtResent,
    TxtSeen,
    ChallengeAnswered,
    AuthorizationValid,
    CsrRecorded,
    CertificateIssued,
    ChainDownloaded,
    ChainRejected,
    CertificateInstalled,
    RenewalPlanned,
    RenewalTarget,
    ValidationBudget,
    WaitNote,
    total=False,
):
    """Everything an order may carry."""


Keys = frozenset[str]


def keys(*contributions: Any) -> Keys:
    """The keys the given contributions (TypedDict classes above) declare."""
    out: set[str] = set()
    for contribution in contributions:
        out |= contribution.__required_keys__ | contribution.__optional_keys__
    return frozenset(out)


ALL_KEYS = keys(OrderData)

# Data that belongs to one ACME order (and the hold before it): cleared whenever a new order
# is placed.
ORDER_KEYS = keys(
    RegistrationHeld,
    OrderRequested,
    OrderPlaced,
    OrderLifetime,
    AuthorizationFound,
    ChallengeFound,
    BrokerSent,
    TxtResent,
    TxtSeen,
    ChallengeAnswered,
    AuthorizationValid,
    CsrRecorded,
    CertificateIssued,
    ChainDownloaded,
    ChainRejected,
)
WAIT_KEYS = keys(WaitNote)
# Keys that hold a claim's fence (a replay's store counts claims from its own start).
FENCE_KEYS = frozenset({"txt_seen_fence"})


_ABSENT: dict[str, None] = dict.fromkeys(ALL_KEYS)
_NO_PLAN: dict[str, None] = dict.fromkeys(keys(RenewalPlan))


def order_data(data: Mapping[str, Any]) -> OrderData:
    """A stored ``data`` column as the engine reads it: every declared key present (``None``
    where the row has none), so that steps index it and mypy checks each key. Values are still
    checked where a hand-edited row could break a step."""
    return cast(OrderData, {**_ABSENT, **data})


def renewal_plan(plan: Mapping[str, Any] | None) -> RenewalPlan:
    """The stored renewal plan, read like :func:`order_data`."""
    return cast(RenewalPlan, {**_NO_PLAN, **(plan or {})})


def without(data: Mapping[str, Any], drop: Keys) -> OrderData:
    """``data`` without the keys in ``drop``."""
    return cast(OrderData, {k: v for k, v in data.items() if k not in drop})
