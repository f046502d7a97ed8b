"""autotls: get and keep a ``*.<peerid>.libp2p.direct`` certificate for a libp2p node.

Everything an embedder needs is a name of this package: :class:`AutoTLS` (the embedding API)
with its events (:class:`CertificateInfo`, :class:`Failure`, :class:`OrderEvent`), settings
(:class:`EngineSettings`, the Let's Encrypt directory URLs, an injectable :class:`Clock`),
the order machine's :class:`State` and :class:`Trigger`, identity keys and PeerIds, the
py-libp2p node adapter (:class:`Libp2pNode`), multiaddrs, and every error the facade can raise
(all :class:`AutoTLSError`; parse errors are also ``ValueError``). :class:`LocalStack` brings up
Pebble and a local broker for trying it out. :func:`replay_transcript` and :func:`assert_replays`
play back what ``AutoTLS(record=DIR)`` recorded. The ``autotls`` command line is ``autotls.cli``.
Everything else is reachable for the curious but may change.

The names below load on first use (PEP 562): ``import autotls`` alone costs nothing, so the
command line can answer ``--help`` or ``status`` without loading aiohttp and the whole
service. ``from autotls import AutoTLS`` works as always.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autotls._lazy import lazy_exports

if TYPE_CHECKING:
    from autotls.acme import ExternalAccountBinding
    from autotls.adapters import LETS_ENCRYPT, LETS_ENCRYPT_STAGING
    from autotls.broker import DEFAULT_BROKER_URL
    from autotls.dnscheck import NameserverError
    from autotls.events import (
        CertificateInfo,
        DeadlineExceeded,
        EventName,
        Failure,
        IssuanceFailed,
        NotStartedError,
    )
    from autotls.fsm.clock import Clock, SystemClock
    from autotls.fsm.errors import (
        AutoTLSError,
        ConfigurationError,
        ErrorClass,
        LocalIOError,
        MisconfiguredError,
    )
    from autotls.fsm.machine import State, Trigger
    from autotls.fsm.ports import EngineSettings
    from autotls.fsm.worker import OrderEvent
    from autotls.localstack.stack import LocalStack
    from autotls.logs import SecretFilter
    from autotls.metrics import AutoTLSCollector, Health, MetricsServer, check_health, metrics_app
    from autotls.multiaddrs import (
        Multiaddr,
        MultiaddrError,
        ip_label,
    )
    from autotls.node import Libp2pNode, NodeError
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
    from autotls.persistence.errors import (
        ActiveOrderExistsError,
        CorruptRowError,
        DatabaseURLError,
        OrderBusyError,
        OrderNotFoundError,
        OrderStateError,
        SchemaOutdatedError,
        SchemaTooNewError,
        StoreError,
        StoreUnavailableError,
    )
    from autotls.recording import (
        ReplayReport,
        TranscriptError,
        assert_replays,
        replay_transcript,
    )
    from autotls.service import AutoTLS, ListeningNode

# Each public name and the module that defines it (tests/test_startup.py checks that this,
# __all__ and the imports above agree).
_EXPORTS: dict[str, str] = {
    "ActiveOrderExistsError": "autotls.persistence.errors",
    "AutoTLS": "autotls.service",
    "AutoTLSCollector": "autotls.metrics",
    "AutoTLSError": "autotls.fsm.errors",
    "CertificateInfo": "autotls.events",
    "Clock": "autotls.fsm.clock",
    "ConfigurationError": "autotls.fsm.errors",
    "CorruptRowError": "autotls.persistence.errors",
    "DEFAULT_BROKER_URL": "autotls.broker",
    "DatabaseURLError": "autotls.persistence.errors",
    "DeadlineExceeded": "autotls.events",
    "EngineSettings": "autotls.fsm.ports",
    "ErrorClass": "autotls.fsm.errors",
    "EventName": "autotls.events",
    "ExternalAccountBinding": "autotls.acme",
    "Failure": "autotls.events",
    "Health": "autotls.metrics",
    "IssuanceFailed": "autotls.events",
    "KeyType": "autotls.peerid",
    "LETS_ENCRYPT": "autotls.adapters",
    "LETS_ENCRYPT_STAGING": "autotls.adapters",
    "Libp2pNode": "autotls.node",
    "MetricsServer": "autotls.metrics",
    "ListeningNode": "autotls.service",
    "LocalIOError": "autotls.fsm.errors",
    "LocalStack": "autotls.localstack.stack",
    "MisconfiguredError": "autotls.fsm.errors",
    "Multiaddr": "autotls.multiaddrs",
    "MultiaddrError": "autotls.multiaddrs",
    "NameserverError": "autotls.dnscheck",
    "NodeError": "autotls.node",
    "NotStartedError": "autotls.events",
    "OrderBusyError": "autotls.persistence.errors",
    "OrderEvent": "autotls.fsm.worker",
    "OrderNotFoundError": "autotls.persistence.errors",
    "OrderStateError": "autotls.persistence.errors",
    "PeerId": "autotls.peerid",
    "PeerIdError": "autotls.peerid",
    "PrivateKey": "autotls.peerid",
    "ReplayReport": "autotls.recording",
    "SchemaOutdatedError": "autotls.persistence.errors",
    "SchemaTooNewError": "autotls.persistence.errors",
    "SecretFilter": "autotls.logs",
    "State": "autotls.fsm.machine",
    "StoreError": "autotls.persistence.errors",
    "StoreUnavailableError": "autotls.persistence.errors",
    "SystemClock": "autotls.fsm.clock",
    "TranscriptError": "autotls.recording",
    "Trigger": "autotls.fsm.machine",
    "assert_replays": "autotls.recording",
    "ip_label": "autotls.multiaddrs",
    "check_health": "autotls.metrics",
    "key_file_exposed": "autotls.peerid",
    "load_private_key": "autotls.peerid",
    "load_private_key_async": "autotls.peerid",
    "metrics_app": "autotls.metrics",
    "replay_transcript": "autotls.recording",
    "save_private_key": "autotls.peerid",
}

__all__ = [
    "DEFAULT_BROKER_URL",
    "LETS_ENCRYPT",
    "LETS_ENCRYPT_STAGING",
    "ActiveOrderExistsError",
    "AutoTLS",
    "AutoTLSCollector",
    "AutoTLSError",
    "CertificateInfo",
    "Clock",
    "ConfigurationError",
    "CorruptRowError",
    "DatabaseURLError",
    "DeadlineExceeded",
    "EngineSettings",
    "ErrorClass",
    "EventName",
    "ExternalAccountBinding",
    "Failure",
    "Health",
    "IssuanceFailed",
    "KeyType",
    "Libp2pNode",
    "ListeningNode",
    "LocalIOError",
    "LocalStack",
    "MetricsServer",
    "MisconfiguredError",
    "Multiaddr",
    "MultiaddrError",
    "NameserverError",
    "NodeError",
    "NotStartedError",
    "OrderBusyError",
    "OrderEvent",
    "OrderNotFoundError",
    "OrderStateError",
    "PeerId",
    "PeerIdError",
    "PrivateKey",
    "ReplayReport",
    "SchemaOutdatedError",
    "SchemaTooNewError",
    "SecretFilter",
    "State",
    "StoreError",
    "StoreUnavailableError",
    "SystemClock",
    "TranscriptError",
    "Trigger",
    "assert_replays",
    "check_health",
    "ip_label",
    "key_file_exposed",
    "load_private_key",
    "load_private_key_async",
    "metrics_app",
    "replay_transcript",
    "save_private_key",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
