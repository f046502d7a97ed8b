"""RFC 5280 §5.3.1 CRLReason codes, by the names RFC 8555 §7.6 refers to.

The one table of revocation reasons: the ACME client accepts exactly these codes, and the
command line offers exactly these names (``autotls revoke --reason``). Code 7 is unassigned.
Pure data, so that the command line can build its parser without loading the ACME client.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

REVOCATION_REASONS: Mapping[str, int] = MappingProxyType(
    {
        "unspecified": 0,
        "keyCompromise": 1,
        "cACompromise": 2,
        "affiliationChanged": 3,
        "superseded": 4,
        "cessationOfOperation": 5,
        "certificateHold": 6,
        "removeFromCRL": 8,
        "privilegeWithdrawn": 9,
        "aACompromise": 10,
    }
)
