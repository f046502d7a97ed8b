"""autotls: get and keep a ``*.<peerid>.libp2p.direct`` certificate for a libp2p node.

The public surface is small: :class:`AutoTLS` (the embedding API), identity keys and PeerIds,
the error types, Prometheus metrics and the health check (:mod:`autotls.metrics`), and the
``autotls`` command line (``autotls.cli``). Everything else is
reachable for the curious but may change.

The names below load on first use (PEP 562): ``import autotls`` alone costs nothing, so the
command line can answer ``--help`` or ``status`` without loading aiohttp and the whole
service. ``from autotls import AutoTLS`` works as always.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autotls._lazy import lazy_exports

if TYPE_CHECKING:
    from autotls.fsm.errors import AutoTLSError, ConfigurationError, ErrorClass
    from autotls.metrics import AutoTLSCollector, Health, MetricsServer, check_health, metrics_app
    from autotls.peerid import (
        KeyType,
        PeerId,
        PeerIdError,
        PrivateKey,
        key_file_exposed,
        load_private_key,
        load_private_key_async,
        save_private_key,
    )
    from autotls.service import (
        AutoTLS,
        CertificateInfo,
        DeadlineExceeded,
        Failure,
        IssuanceFailed,
    )

# Each public name and the module that defines it (tests/test_startup.py checks that this,
# __all__ and the imports above agree).
_EXPORTS: dict[str, str] = {
    "AutoTLS": "autotls.service",
    "AutoTLSCollector": "autotls.metrics",
    "AutoTLSError": "autotls.fsm.errors",
    "CertificateInfo": "autotls.service",
    "ConfigurationError": "autotls.fsm.errors",
    "DeadlineExceeded": "autotls.service",
    "ErrorClass": "autotls.fsm.errors",
    "Failure": "autotls.service",
    "Health": "autotls.metrics",
    "IssuanceFailed": "autotls.service",
    "KeyType": "autotls.peerid",
    "MetricsServer": "autotls.metrics",
    "PeerId": "autotls.peerid",
    "PeerIdError": "autotls.peerid",
    "PrivateKey": "autotls.peerid",
    "check_health": "autotls.metrics",
    "key_file_exposed": "autotls.peerid",
    "load_private_key": "autotls.peerid",
    "load_private_key_async": "autotls.peerid",
    "metrics_app": "autotls.metrics",
    "save_private_key": "autotls.peerid",
}

__all__ = [
    "AutoTLS",
    "AutoTLSCollector",
    "AutoTLSError",
    "CertificateInfo",
    "ConfigurationError",
    "DeadlineExceeded",
    "ErrorClass",
    "Failure",
    "Health",
    "IssuanceFailed",
    "KeyType",
    "MetricsServer",
    "PeerId",
    "PeerIdError",
    "PrivateKey",
    "check_health",
    "key_file_exposed",
    "load_private_key",
    "load_private_key_async",
    "metrics_app",
    "save_private_key",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
