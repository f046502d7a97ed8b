"""An async ACME client (RFC 8555, RFC 9773 ARI) on aiohttp and cryptography.

The public surface: :class:`AcmeClient`, the resource records it returns, the typed problems it
raises (each with an ``error_class`` from :mod:`autotls.fsm.errors`),
and the pure helpers the engine
needs around it (keys, DNS-01 value, CSR, CertID, Retry-After).

The names below load on first use (PEP 562): the command line reads an account key without
loading aiohttp, and ``from autotls.acme import AcmeClient`` works as always.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autotls._lazy import lazy_exports

if TYPE_CHECKING:
    from autotls.acme.ari import cert_id
    from autotls.acme.client import AcmeClient
    from autotls.acme.csr import generate_certificate_key, make_csr
    from autotls.acme.jws import (
        AccountKey,
        ExternalAccountBinding,
        dns01_value,
        dump_account_key,
        generate_account_key,
        jwk_thumbprint,
        key_authorization,
        load_account_key,
    )
    from autotls.acme.messages import (
        Account,
        Authorization,
        CertificateChain,
        Challenge,
        Directory,
        Identifier,
        Order,
        RenewalInfo,
    )
    from autotls.acme.problems import (
        AccountDoesNotExist,
        AcmeInputError,
        AcmeNetworkError,
        AcmeProblem,
        AcmeProtocolError,
        AlreadyReplaced,
        AlreadyRevoked,
        BadCSR,
        BadNonce,
        BadPublicKey,
        BadSignatureAlgorithm,
        ExternalAccountRequired,
        InvalidProfile,
        Malformed,
        OrderNotReady,
        RateLimited,
        RejectedIdentifier,
        ServerInternal,
        Subproblem,
        Unauthorized,
        UserActionRequired,
    )
    from autotls.acme.revocation import REVOCATION_REASONS
    from autotls.http import parse_retry_after

# Each public name and the module that defines it (tests/test_startup.py checks that this,
# __all__ and the imports above agree).
_EXPORTS: dict[str, str] = {
    "Account": "autotls.acme.messages",
    "AccountDoesNotExist": "autotls.acme.problems",
    "AccountKey": "autotls.acme.jws",
    "AcmeClient": "autotls.acme.client",
    "AcmeInputError": "autotls.acme.problems",
    "AcmeNetworkError": "autotls.acme.problems",
    "AcmeProblem": "autotls.acme.problems",
    "AcmeProtocolError": "autotls.acme.problems",
    "AlreadyReplaced": "autotls.acme.problems",
    "AlreadyRevoked": "autotls.acme.problems",
    "Authorization": "autotls.acme.messages",
    "BadCSR": "autotls.acme.problems",
    "BadNonce": "autotls.acme.problems",
    "BadPublicKey": "autotls.acme.problems",
    "BadSignatureAlgorithm": "autotls.acme.problems",
    "CertificateChain": "autotls.acme.messages",
    "Challenge": "autotls.acme.messages",
    "Directory": "autotls.acme.messages",
    "ExternalAccountBinding": "autotls.acme.jws",
    "ExternalAccountRequired": "autotls.acme.problems",
    "Identifier": "autotls.acme.messages",
    "InvalidProfile": "autotls.acme.problems",
    "Malformed": "autotls.acme.problems",
    "Order": "autotls.acme.messages",
    "OrderNotReady": "autotls.acme.problems",
    "REVOCATION_REASONS": "autotls.acme.revocation",
    "RateLimited": "autotls.acme.problems",
    "RejectedIdentifier": "autotls.acme.problems",
    "RenewalInfo": "autotls.acme.messages",
    "ServerInternal": "autotls.acme.problems",
    "Subproblem": "autotls.acme.problems",
    "Unauthorized": "autotls.acme.problems",
    "UserActionRequired": "autotls.acme.problems",
    "cert_id": "autotls.acme.ari",
    "dns01_value": "autotls.acme.jws",
    "dump_account_key": "autotls.acme.jws",
    "generate_account_key": "autotls.acme.jws",
    "generate_certificate_key": "autotls.acme.csr",
    "jwk_thumbprint": "autotls.acme.jws",
    "key_authorization": "autotls.acme.jws",
    "load_account_key": "autotls.acme.jws",
    "make_csr": "autotls.acme.csr",
    "parse_retry_after": "autotls.http",
}

__all__ = [
    "REVOCATION_REASONS",
    "Account",
    "AccountDoesNotExist",
    "AccountKey",
    "AcmeClient",
    "AcmeInputError",
    "AcmeNetworkError",
    "AcmeProblem",
    "AcmeProtocolError",
    "AlreadyReplaced",
    "AlreadyRevoked",
    "Authorization",
    "BadCSR",
    "BadNonce",
    "BadPublicKey",
    "BadSignatureAlgorithm",
    "CertificateChain",
    "Challenge",
    "Directory",
    "ExternalAccountBinding",
    "ExternalAccountRequired",
    "Identifier",
    "InvalidProfile",
    "Malformed",
    "Order",
    "OrderNotReady",
    "RateLimited",
    "RejectedIdentifier",
    "RenewalInfo",
    "ServerInternal",
    "Subproblem",
    "Unauthorized",
    "UserActionRequired",
    "cert_id",
    "dns01_value",
    "dump_account_key",
    "generate_account_key",
    "generate_certificate_key",
    "jwk_thumbprint",
    "key_authorization",
    "load_account_key",
    "make_csr",
    "parse_retry_after",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
