"""What the facade needs from the disk: a safe data directory, the trust roots issued chains
must build to, and the certificate files restored from the store when they went missing."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from autotls._files import directory_problem, make_private_dirs, write_atomic, write_secret
from autotls.fsm.errors import ConfigurationError, LocalIOError
from autotls.install import load_trust_roots
from autotls.persistence.records import CertificateRecord

log = logging.getLogger("autotls.service")


def prepare_data_dir(path: Path) -> None:
    """Create the data directory 0700, or refuse an existing one (or its ``certs``) that
    others may write, with a line that says how to fix it."""
    make_private_dirs(path)
    for directory in (path, path / "certs"):
        problem = directory_problem(directory)
        if problem is not None:
            raise ConfigurationError(f"refusing the data directory: {problem}")


def resolve_trust_roots(
    trust_roots: Sequence[x509.Certificate] | str | Path | None,
) -> list[x509.Certificate]:
    """The trust roots as given: certificates, a PEM bundle's path, or (``None``) the
    system's."""
    if isinstance(trust_roots, (str, Path)):
        return load_trust_roots(trust_roots)
    if trust_roots is None:
        return system_trust_roots()
    return list(trust_roots)


def system_trust_roots() -> list[x509.Certificate]:
    """The system CA bundle, read from its explicit path (never from SSL_CERT_FILE)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.exists(candidate):
            return load_trust_roots(candidate)
    log.warning("no system CA bundle found: issued chains are checked only for consistency")
    return []


def restore_files(chain_path: Path, key_path: Path, cert: CertificateRecord) -> None:
    """Rewrite the certificate's files from the store when they are missing or differ; a
    failure to write is a warning (the certificate is served from memory)."""
    if _files_hold(chain_path, key_path, cert):
        return
    try:
        make_private_dirs(chain_path.parent)
        write_secret(key_path, cert.key_pem)
        write_atomic(chain_path, cert.chain_pem.encode())
        log.info("restored certificate %s for %s from the store", cert.serial, cert.peer_id)
    except OSError as exc:
        log.warning("%s", LocalIOError.from_os_error(exc, "write", chain_path.parent))


def _files_hold(chain_path: Path, key_path: Path, cert: CertificateRecord) -> bool:
    try:
        return chain_path.read_text() == cert.chain_pem and key_path.read_bytes() == cert.key_pem
    except OSError:
        return False
