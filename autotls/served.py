"""The certificate the facade serves, and how it learns that it changed.

What this module owns, and nothing else, for :class:`autotls.AutoTLS`:

* :class:`ServedCertificate`: which certificate is served and announced. The newest valid one
  the store holds, after a restart or once the process holding the order's lease installed it
  (its files rewritten when they went missing, the live TLS context reloaded); the one this
  process's installer just served, which becomes current once the worker commits it as
  Installed; and the serials an operator revoked (``autotls revoke`` records them on the
  certificate's row): a revoked certificate is still served until its replacement arrives,
  but no longer advertised.
* :func:`watch_store`: the loop that has the facade read the store again, every poll and at
  once when the store's change feed tells of another process's move.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta

from autotls.datadir import restore_files
from autotls.events import CertificateInfo, Subscribers
from autotls.fsm.clock import Clock
from autotls.fsm.ports import InstalledCertificate
from autotls.fsm.worker import order_fields
from autotls.install import Installer, LiveTlsContext
from autotls.persistence.changes import Change
from autotls.persistence.errors import describe_database_error
from autotls.persistence.records import CertificateRecord
from autotls.persistence.store import Store

__all__ = ["ServedCertificate", "watch_store"]

log = logging.getLogger("autotls.service")


class ServedCertificate:
    """The certificate one peer's facade serves; it tells ``loaded`` and ``renewed`` to the
    facade's subscribers."""

    def __init__(
        self,
        peer_id: str,
        domain: str,
        installer: Installer,
        tls: LiveTlsContext,
        subscribers: Subscribers,
    ) -> None:
        self.peer_id = peer_id
        self.domain = domain
        self.installer = installer
        self.tls = tls
        self._subscribers = subscribers
        self.current: CertificateInfo | None = None
        self._installed: CertificateInfo | None = None  # installed, not yet committed
        self.revoked: frozenset[str] = frozenset()

    def valid(self, now: datetime) -> CertificateInfo | None:
        """The current certificate while it is valid: not expired, not known to be revoked."""
        cert = self.current
        if cert is None or cert.not_after <= now or cert.serial in self.revoked:
            return None
        return cert

    async def load_newest(
        self, certificates: Sequence[CertificateRecord], *, now: datetime, announce: bool
    ) -> CertificateInfo | None:
        """Serve the newest valid one of the peer's stored ``certificates`` when it is not
        the one served already; note the revocations recorded on them. Returns the newly
        served certificate, if any."""
        self.note_revoked(c for c in certificates if c.revoked_at is not None)
        valid = [c for c in certificates if c.not_after > now]
        if not valid:
            return None
        newest = max(valid, key=lambda c: c.id)  # the last issued (a renewal may be shorter)
        current = self.current
        if current is not None and current.serial == newest.serial:
            return None
        chain_path, key_path = self.installer.paths(self.peer_id)
        restore_files(chain_path, key_path, newest)
        self.tls.load_pem(newest.chain_pem, newest.key_pem, None)
        info = self._info(newest.serial, newest.not_before, newest.not_after)
        self.current = info
        if announce:
            await self._subscribers.emit("loaded" if current is None else "renewed", info)
        return info

    async def on_install(self, peer_id: str, installed: InstalledCertificate) -> None:
        """The installer already serves the new certificate; it becomes the current one
        (events, :attr:`autotls.AutoTLS.certificate`, forge addresses) once the worker commits
        it as Installed (:meth:`adopt_installed`)."""
        self._installed = self._info(installed.serial, installed.not_before, installed.not_after)

    async def adopt_installed(self) -> None:
        """The worker committed Installed: the certificate the installer served is current."""
        if self._installed is None:
            return
        previous, self.current, self._installed = self.current, self._installed, None
        if previous is None:
            await self._subscribers.emit("loaded", self.current)
        elif previous.serial != self.current.serial:
            await self._subscribers.emit("renewed", self.current)

    def note_revoked(self, certificates: Iterable[CertificateRecord]) -> None:
        for cert in certificates:
            if cert.serial not in self.revoked:
                self.revoked = self.revoked | {cert.serial}
                log.info(
                    "certificate %s of %s was revoked: no longer advertised",
                    cert.serial,
                    self.domain,
                    extra=order_fields(cert.order_id, self.peer_id, None),
                )

    def _info(self, serial: str, not_before: datetime, not_after: datetime) -> CertificateInfo:
        chain_path, key_path = self.installer.paths(self.peer_id)
        return CertificateInfo(
            self.peer_id, self.domain, serial, not_before, not_after, chain_path, key_path
        )


async def watch_store(
    store: Store,
    clock: Clock,
    poll: timedelta,
    *,
    peer_id: str,
    own_actor: str,
    refresh: Callable[[], Awaitable[object]],
) -> None:
    """Until cancelled: ``refresh()`` every ``poll``, and at once when another actor than
    ``own_actor`` moved ``peer_id``'s order (another process installed a certificate, an
    operator acted). A failure to read the store is a warning."""
    told = asyncio.Event()
    peers = frozenset({peer_id})

    def on_change(changes: Sequence[Change]) -> None:
        if any(c.concerns(peers) and c.actor != own_actor for c in changes):
            told.set()

    unsubscribe = store.on_change(on_change)
    try:
        while True:
            await clock.sleep_until(clock.now() + poll, told)
            told.clear()
            try:
                await refresh()  # waiters re-read the order: another process moved it
            except Exception as exc:
                log.warning("reading certificates from the store: %s", describe_database_error(exc))
    finally:
        unsubscribe()
