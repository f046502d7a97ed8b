"""Plain, immutable values that cross the store boundary.

The engine reads an :class:`OrderSnapshot` (taken under a lease) and hands back a
:class:`CommitPlan`; the store applies a plan in one transaction guarded by the fence.
Nothing here holds a session or touches the network.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class AccountRecord:
    id: int
    directory_url: str
    key_pem: bytes = field(repr=False)
    url: str | None
    status: str


@dataclass(frozen=True)
class CertificateRecord:
    id: int
    order_id: int
    peer_id: str
    chain_pem: str
    key_pem: bytes = field(repr=False)
    serial: str
    cert_id: str | None
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    acme_order_url: str | None = None
    replaces_cert_id: str | None = None
    # An operator revoked it (``autotls revoke``): it is served until its replacement is
    # installed, but no longer advertised. ``revocation_reason`` is the RFC 5280 name.
    revoked_at: datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True)
class OrderSnapshot:
    id: int
    peer_id: str
    identifier: str
    state: str
    data: Mapping[str, Any]
    fence: int
    attempts: int
    next_run_at: datetime
    account: AccountRecord | None
    cert_key_pem: bytes | None = field(repr=False)
    certificate: CertificateRecord | None
    last_error_class: str | None
    last_error_message: str | None
    lease_owner: str | None
    lease_until: datetime | None
    created_at: datetime
    updated_at: datetime
    last_problem: Mapping[str, Any] | None = None  # the server's problem document, if any


@dataclass(frozen=True)
class JournalRecord:
    order_id: int
    seq: int
    kind: str
    from_state: str | None
    to_state: str
    trigger: str
    at: datetime
    worker: str | None
    fence: int
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class NewAccount:
    """Create the store's account for a directory (or adopt the one another worker made)."""

    directory_url: str
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class AccountUpdate:
    url: str | None
    status: str


@dataclass(frozen=True)
class NewCertificate:
    chain_pem: str
    key_pem: bytes = field(repr=False)
    serial: str
    cert_id: str | None
    not_before: datetime
    not_after: datetime
    acme_order_url: str | None
    replaces_cert_id: str | None


@dataclass(frozen=True)
class Revocation:
    """Record that a certificate was revoked (the commit's time is the moment)."""

    certificate_id: int
    reason: str | None


class Keep(enum.Enum):
    """Marker for "leave this column as it is" in a :class:`CommitPlan`."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class JournalNote:
    kind: str  # "transition" | "error" | "operator"
    trigger: str
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class CommitPlan:
    """Everything one step's result changes, applied atomically ``WHERE id AND fence``.

    ``cert_key_pem``: ``None`` clears the in-flight key, :data:`KEEP` leaves it alone.
    ``journal``: ``None`` for waits (polling would otherwise flood the journal).
    """

    to_state: str
    data: Mapping[str, Any]
    next_run_at: datetime
    attempts: int
    last_error_class: str | None
    last_error_message: str | None
    last_problem: Mapping[str, Any] | None
    journal: JournalNote | None = None
    new_account: NewAccount | None = None
    account_update: AccountUpdate | None = None
    cert_key_pem: bytes | Keep | None = KEEP
    new_certificate: NewCertificate | None = None
    revocation: Revocation | None = None
