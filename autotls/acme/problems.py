"""ACME failures as types: problem documents (RFC 8555 §6.7, RFC 7807) and everything else that
can go wrong between us and a CA, each carrying an :class:`autotls.fsm.errors.ErrorClass`.

This module owns the classification table: the engine never looks at a problem type, only at
``error_class`` (and, where it must branch, at the subclass). Parsing is pure: a status, the
headers we care about and the body go in, an exception instance comes out.

Classification of problem types (short name after ``urn:ietf:params:acme:error:``)::

    transient      badNonce, serverInternal, orderNotReady, unknown types, any 5xx
    rate_limited   rateLimited, and any problem sent with HTTP 429
    order_invalid  caa, connection, dns, incorrectResponse, tls, alreadyReplaced
                   (the order as asked cannot proceed: order again, without ``replaces``)
    permanent      accountDoesNotExist, unauthorized, malformed, invalidProfile, badCSR,
                   badPublicKey, badSignatureAlgorithm, badRevocationReason, alreadyRevoked,
                   externalAccountRequired, userActionRequired, invalidContact,
                   unsupportedContact, rejectedIdentifier, unsupportedIdentifier
    compound       the most severe class among its subproblems (permanent if it has none)

Where the engine must branch on more than the class, the problem is also a typed port error of
:mod:`autotls.fsm.errors`: ``accountDoesNotExist`` is an ``AccountUnknownError``, and a
newOrder that carried ``replaces`` turns its refusal into a ``ReplacesRefusedError``
(:func:`for_new_order`).

Validation failures are not top-level problems: they live in a challenge's ``error`` (and an
order's), which :mod:`autotls.acme.messages` parses with :func:`problem_from_document`; the
engine decides what an ``invalid`` authorization or order means.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from autotls.fsm.errors import (
    AccountUnknownError,
    AutoTLSError,
    ConfigurationError,
    ErrorClass,
    ReplacesRefusedError,
    TransientError,
)

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"

CLASSIFICATION: Mapping[str, ErrorClass] = {
    "badNonce": ErrorClass.TRANSIENT,
    "serverInternal": ErrorClass.TRANSIENT,
    "orderNotReady": ErrorClass.TRANSIENT,
    "rateLimited": ErrorClass.RATE_LIMITED,
    "caa": ErrorClass.ORDER_INVALID,
    "connection": ErrorClass.ORDER_INVALID,
    "dns": ErrorClass.ORDER_INVALID,
    "incorrectResponse": ErrorClass.ORDER_INVALID,
    "tls": ErrorClass.ORDER_INVALID,
    "alreadyReplaced": ErrorClass.ORDER_INVALID,
    "accountDoesNotExist": ErrorClass.PERMANENT,
    "unauthorized": ErrorClass.PERMANENT,
    "malformed": ErrorClass.PERMANENT,
    "invalidProfile": ErrorClass.PERMANENT,
    "badCSR": ErrorClass.PERMANENT,
    "badPublicKey": ErrorClass.PERMANENT,
    "badSignatureAlgorithm": ErrorClass.PERMANENT,
    "badRevocationReason": ErrorClass.PERMANENT,
    "alreadyRevoked": ErrorClass.PERMANENT,
    "externalAccountRequired": ErrorClass.PERMANENT,
    "userActionRequired": ErrorClass.PERMANENT,
    "invalidContact": ErrorClass.PERMANENT,
    "unsupportedContact": ErrorClass.PERMANENT,
    "rejectedIdentifier": ErrorClass.PERMANENT,
    "unsupportedIdentifier": ErrorClass.PERMANENT,
}

# Most severe first: a compound problem takes the first class any subproblem has.
_SEVERITY = (
    ErrorClass.PERMANENT,
    ErrorClass.RATE_LIMITED,
    ErrorClass.ORDER_INVALID,
    ErrorClass.TRANSIENT,
)


def short_kind(problem_type: str) -> str | None:
    """``urn:ietf:params:acme:error:badNonce`` -> ``badNonce``; None for non-ACME types."""
    if problem_type.startswith(ACME_ERROR_PREFIX):
        return problem_type[len(ACME_ERROR_PREFIX) :] or None
    return None


def classify(
    problem_type: str, status: int | None, subproblems: Sequence[Subproblem] = ()
) -> ErrorClass:
    """The table in the module docstring, as a function."""
    kind = short_kind(problem_type)
    if status == 429 or kind == "rateLimited":
        return ErrorClass.RATE_LIMITED
    if kind == "compound":
        classes = {classify(sub.type, None) for sub in subproblems}
        for candidate in _SEVERITY:
            if candidate in classes:
                return candidate
        return ErrorClass.PERMANENT
    if kind is not None and kind in CLASSIFICATION:
        return CLASSIFICATION[kind]
    # Unknown trouble defaults to transient (autotls.fsm.errors): a 5xx certainly is, and an unknown
    # 4xx type is more likely a server novelty than a reason to give up on the certificate.
    return ErrorClass.TRANSIENT


@dataclass(frozen=True)
class Subproblem:
    """One entry of a problem's ``subproblems`` (RFC 8555 §6.7.1)."""

    type: str
    detail: str
    identifier: Mapping[str, str] | None

    @property
    def kind(self) -> str | None:
        return short_kind(self.type)


class AcmeProblem(AutoTLSError):
    """A problem document the CA sent. Subclasses exist for the types callers branch on; any
    other type is an instance of this class with ``kind`` set to its short name."""

    kind_name: ClassVar[str | None] = None

    def __init__(
        self,
        problem_type: str,
        detail: str,
        *,
        status: int | None = None,
        subproblems: Sequence[Subproblem] = (),
        retry_after: float | None = None,
        problem: Mapping[str, Any] | None = None,
        instance: str | None = None,
        url: str | None = None,
    ) -> None:
        self.type = problem_type
        self.detail = detail
        self.status = status
        self.subproblems = list(subproblems)
        self.instance = instance
        self.url = url
        # The server's words first: one-line views (status tables, log lines) cut the end.
        where = f" at {url}" if url else ""
        code = f", HTTP {status}" if status is not None else ""
        summary = f"ACME {short_kind(problem_type) or problem_type}{code}{where}"
        super().__init__(
            f"{' '.join(detail.split())} ({summary})" if detail.strip() else summary,
            error_class=classify(problem_type, status, self.subproblems),
            retry_after=retry_after,
            problem=problem if problem is not None else {"type": problem_type, "detail": detail},
        )

    @property
    def kind(self) -> str | None:
        return short_kind(self.type)


class BadNonce(AcmeProblem):
    kind_name = "badNonce"


class RateLimited(AcmeProblem):
    kind_name = "rateLimited"


class AccountDoesNotExist(AcmeProblem, AccountUnknownError):
    """Also the engine's typed port error: the engine registers the stored key again."""

    kind_name = "accountDoesNotExist"


class AlreadyReplaced(AcmeProblem):
    kind_name = "alreadyReplaced"


class OrderNotReady(AcmeProblem):
    kind_name = "orderNotReady"


class InvalidProfile(AcmeProblem):
    kind_name = "invalidProfile"


class Unauthorized(AcmeProblem):
    kind_name = "unauthorized"


class Malformed(AcmeProblem):
    kind_name = "malformed"


class ServerInternal(AcmeProblem):
    kind_name = "serverInternal"


class ExternalAccountRequired(AcmeProblem):
    kind_name = "externalAccountRequired"


class UserActionRequired(AcmeProblem):
    kind_name = "userActionRequired"


class BadCSR(AcmeProblem):
    kind_name = "badCSR"


class BadPublicKey(AcmeProblem):
    kind_name = "badPublicKey"


class BadSignatureAlgorithm(AcmeProblem):
    kind_name = "badSignatureAlgorithm"


class RejectedIdentifier(AcmeProblem):
    kind_name = "rejectedIdentifier"


class AlreadyRevoked(AcmeProblem):
    kind_name = "alreadyRevoked"


_BY_KIND: Mapping[str, type[AcmeProblem]] = {
    cls.kind_name: cls
    for cls in (
        BadNonce,
        RateLimited,
        AccountDoesNotExist,
        AlreadyReplaced,
        OrderNotReady,
        InvalidProfile,
        Unauthorized,
        Malformed,
        ServerInternal,
        ExternalAccountRequired,
        UserActionRequired,
        BadCSR,
        BadPublicKey,
        BadSignatureAlgorithm,
        RejectedIdentifier,
        AlreadyRevoked,
    )
    if cls.kind_name is not None
}


class AcmeNetworkError(TransientError):
    """We could not get an answer: timeout, refused or reset connection, TLS failure, or a 5xx
    whose body is not a problem document (a proxy's error page)."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.url = url
        self.status = status


class AcmeProtocolError(AutoTLSError):
    """The server's answer breaks the protocol: invalid JSON, a missing or mistyped field, a body
    over the size limit. Transient by default: a CA answering garbage is usually having a bad
    minute, and giving up on the certificate would be worse than retrying later."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        error_class: ErrorClass | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, error_class=error_class, retry_after=retry_after)
        self.url = url
        self.status = status


class AcmeInputError(ConfigurationError, ValueError):
    """What the caller handed us is unusable (unsupported key, malformed PEM or name, a
    certificate without the extension CertID needs)."""


def problem_from_document(
    document: Any,
    *,
    status: int | None = None,
    retry_after: float | None = None,
    url: str | None = None,
) -> AcmeProblem:
    """Build the typed exception for a problem document (raise on a document that is not one)."""
    if not isinstance(document, Mapping):
        raise AcmeProtocolError(
            f"problem document is a {type(document).__name__}, not an object", url=url
        )
    problem_type = document.get("type", "about:blank")
    if not isinstance(problem_type, str) or not problem_type:
        raise AcmeProtocolError("problem document: field 'type' must be a string", url=url)
    detail = document.get("detail", "")
    if not isinstance(detail, str):
        raise AcmeProtocolError("problem document: field 'detail' must be a string", url=url)
    instance = document.get("instance")
    if instance is not None and not isinstance(instance, str):
        raise AcmeProtocolError("problem document: field 'instance' must be a string", url=url)
    doc_status = document.get("status")
    if status is None and isinstance(doc_status, int) and not isinstance(doc_status, bool):
        status = doc_status
    subproblems = _parse_subproblems(document.get("subproblems"), url)
    kind = short_kind(problem_type)
    cls = _BY_KIND.get(kind, AcmeProblem) if kind is not None else AcmeProblem
    return cls(
        problem_type,
        detail,
        status=status,
        subproblems=subproblems,
        retry_after=retry_after,
        problem=document,
        instance=instance,
        url=url,
    )


def for_new_order(error: AutoTLSError, *, replaces: str | None) -> AutoTLSError:
    """What a newOrder that failed with ``error`` raises to the engine.

    With ``replaces``, any problem that is neither transient, a rate limit nor an unknown
    account is a refusal of ``replaces`` (:class:`ReplacesRefusedError`), and the engine orders
    again without it. Let's Encrypt refuses ``replaces`` in several shapes (409
    ``alreadyReplaced``; 404 ``malformed`` for a serial it does not know; 403 ``unauthorized``
    when another account requested the certificate; 400 ``malformed`` when the identifiers
    differ) and only the first has a type of its own: telling them apart would mean reading
    the server's prose. Asking once more without ``replaces`` costs one request, and a problem
    that had nothing to do with ``replaces`` comes back unchanged on that request."""
    if (
        replaces is None
        or not isinstance(error, AcmeProblem)
        or isinstance(error, AccountUnknownError)
        or error.error_class not in (ErrorClass.PERMANENT, ErrorClass.ORDER_INVALID)
    ):
        return error
    return ReplacesRefusedError(
        f"the CA refused to let the order replace {replaces}: {error.message}",
        problem=error.problem,
    )


def _parse_subproblems(raw: Any, url: str | None) -> list[Subproblem]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise AcmeProtocolError("problem document: field 'subproblems' must be a list", url=url)
    subproblems = []
    for index, item in enumerate(raw):
        where = f"problem document: subproblems[{index}]"
        if not isinstance(item, Mapping):
            raise AcmeProtocolError(f"{where} must be an object", url=url)
        sub_type = item.get("type", "about:blank")
        sub_detail = item.get("detail", "")
        identifier = item.get("identifier")
        if not isinstance(sub_type, str) or not isinstance(sub_detail, str):
            raise AcmeProtocolError(f"{where}: 'type' and 'detail' must be strings", url=url)
        if identifier is not None and not (
            isinstance(identifier, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in identifier.items())
        ):
            raise AcmeProtocolError(f"{where}: 'identifier' must be an object of strings", url=url)
        subproblems.append(
            Subproblem(sub_type, sub_detail, dict(identifier) if identifier else None)
        )
    return subproblems


def error_for_response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    retry_after: float | None,
    url: str,
) -> AutoTLSError:
    """The exception for a non-2xx answer. A problem document wins; without one, the status
    decides (429 is still a rate limit, 5xx a network-level failure)."""
    document: Any = None
    if body and ("json" in content_type or body.lstrip()[:1] == b"{"):
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            document = None
    if isinstance(document, Mapping) and isinstance(document.get("type"), str):
        return problem_from_document(document, status=status, retry_after=retry_after, url=url)
    if status == 429:
        return RateLimited(
            ACME_ERROR_PREFIX + "rateLimited",
            "HTTP 429 without a problem document",
            status=status,
            retry_after=retry_after,
            url=url,
        )
    if status >= 500:
        return AcmeNetworkError(
            f"HTTP {status} from {url} without a problem document",
            url=url,
            status=status,
            retry_after=retry_after,
        )
    if 300 <= status < 400:
        # Never followed (RFC 8555 URLs are exact, and a JWS is signed for its URL) and
        # transient, like a broker's redirect (autotls.broker): something in front of a CA
        # that answered before (a captive portal, a proxy's login page) goes away. A --ca URL
        # that redirects from the start is refused at start by the directory check.
        return AcmeProtocolError(
            f"HTTP {status} redirect from {url}: redirects are not followed "
            "(is a captive portal or a proxy in the way?)",
            url=url,
            status=status,
            retry_after=retry_after,
        )
    return AcmeProtocolError(
        f"HTTP {status} from {url} without a problem document",
        url=url,
        status=status,
        retry_after=retry_after,
    )
