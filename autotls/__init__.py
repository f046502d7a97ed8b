"""autotls: get and keep a ``*.<peerid>.libp2p.direct`` certificate for a libp2p node.

The public surface is small: :class:`AutoTLS` (the embedding API), identity keys and PeerIds,
the error types, and the ``autotls`` command line (``autotls.cli``). Everything else is
reachable for the curious but may change.
"""

from autotls.fsm.errors import AutoTLSError, ConfigurationError, ErrorClass
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
from autotls.service import AutoTLS, CertificateInfo, DeadlineExceeded, Failure, IssuanceFailed

__all__ = [
    "AutoTLS",
    "AutoTLSError",
    "CertificateInfo",
    "ConfigurationError",
    "DeadlineExceeded",
    "ErrorClass",
    "Failure",
    "IssuanceFailed",
    "KeyType",
    "PeerId",
    "PeerIdError",
    "PrivateKey",
    "key_file_exposed",
    "load_private_key",
    "load_private_key_async",
    "save_private_key",
]
