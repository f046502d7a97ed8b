"""The embedding API: one object an asyncio service starts and stops.

::

    auto = AutoTLS(identity, data_dir="/var/lib/mynode")
    node = Libp2pNode(identity, listen=[...], autotls=auto)  # serves auto's certificate,
                                                             # advertises its forge addresses,
                                                             # and gives it its addresses
    auto.on("renewed", lambda cert: ...)  # "loaded" | "renewed" | "failed" | "transition"
    async with node, auto:
        announce(auto.forge_addresses())  # empty until a valid certificate is held

Without py-libp2p, give ``addresses`` (a list or a callable) and serve :attr:`ssl_context`
from any TLS server; any object with ``listen_addresses`` can be :meth:`attach`-ed instead.

It owns a store (SQLite in ``data_dir`` unless ``database_url`` says otherwise), the engine's
adapters, and a worker that serves only this peer's order. On start it restores the newest
certificate from the store (rewriting its files if they went missing) before anything else,
so a restarted node serves TLS at once; a missing order is created; an order left mid-flight
by a crash resumes exactly where it stopped. The injected ``clock`` is the one every part
reads: the worker, the installer's date checks, the placeholder certificate, the ACME client
and the broker client (Retry-After dates).

Several processes may serve one identity (one data directory or PostgreSQL database): one
holds the order's lease; the others serve what it installed, told by the store's change feed
(else every ``store_poll``, also the idle worker's longest sleep). Start refuses a data
directory others may write and a ``directory_url`` that is not ACME, before any order is
touched. ``wait_for_certificate(deadline=)`` raises :class:`DeadlineExceeded` when the next
attempt comes after it. ``record=DIR`` writes each order's sanitised, capped transcript
(:mod:`autotls.recording`; ``autotls replay`` plays it back).

Every error the facade raises is an :class:`~autotls.fsm.errors.AutoTLSError`. Its rooms:
:mod:`autotls.events` (events, payloads, errors), :mod:`autotls.served` (which certificate is
served; the store watcher), :mod:`autotls.datadir` (the data directory, the trust roots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

from cryptography import x509

from autotls.acme import ExternalAccountBinding
from autotls.adapters import DIRECTORY_CACHE_FILE, LETS_ENCRYPT, AcmeAdapter, BrokerAdapter
from autotls.broker import DEFAULT_BROKER_URL
from autotls.datadir import prepare_data_dir, resolve_trust_roots
from autotls.dnscheck import AuthoritativeTxtChecker, parse_nameserver
from autotls.events import (
    CertificateCallback,
    CertificateInfo,
    DeadlineExceeded,
    EventName,
    Failure,
    FailureCallback,
    IssuanceFailed,
    NotStartedError,
    Signal,
    Subscribers,
    TransitionCallback,
)
from autotls.fsm import operator
from autotls.fsm.clock import Clock, SystemClock
from autotls.fsm.errors import ConfigurationError
from autotls.fsm.machine import State, Trigger
from autotls.fsm.ports import EngineSettings, Ports
from autotls.fsm.worker import OrderEvent, Worker, order_fields
from autotls.http import ServiceObserver, ServiceObservers
from autotls.install import Installer, LiveTlsContext
from autotls.interfaces import DialBackAddresses, ListeningNode
from autotls.multiaddrs import (
    DEFAULT_ZONE,
    advertised_forge_addresses,
    forge_addresses,
    wildcard_name,
)
from autotls.peerid import PrivateKey
from autotls.persistence.errors import OrderBusyError, OrderStateError
from autotls.persistence.records import OrderSnapshot
from autotls.persistence.store import Store
from autotls.persistence.urls import DATABASE_FILE
from autotls.recording.transcript import DEFAULT_LIMIT
from autotls.served import ServedCertificate, watch_store

if TYPE_CHECKING:
    from autotls.recording import Recorder

__all__ = [
    "AutoTLS",
    "CertificateInfo",
    "DeadlineExceeded",
    "Failure",
    "IssuanceFailed",
    "ListeningNode",
    "NotStartedError",
]

log = logging.getLogger(__name__)

# How long start() waits for the ACME directory before going on without the check.
DIRECTORY_CHECK_TIMEOUT_S = 10.0


class AutoTLS:
    def __init__(
        self,
        identity: PrivateKey,
        *,
        data_dir: str | Path,
        addresses: Sequence[str] | Callable[[], Sequence[str]] | None = None,
        database_url: str | None = None,
        directory_url: str = LETS_ENCRYPT,
        ca_file: str | None = None,
        broker_url: str = DEFAULT_BROKER_URL,
        broker_ca_file: str | None = None,
        forge_auth: str | None = None,
        dns_servers: Sequence[str] | None = None,
        allow_private_addresses: bool = False,
        trust_roots: Sequence[x509.Certificate] | str | Path | None = None,
        eab: ExternalAccountBinding | None = None,
        profile: str | None = None,
        contact: Sequence[str] = (),
        preferred_chain: str | None = None,
        zone: str = DEFAULT_ZONE,
        settings: EngineSettings | None = None,
        registration_delay: timedelta | None = None,
        clock: Clock | None = None,
        run_worker: bool = True,
        check_directory: bool = True,
        store_poll: timedelta = timedelta(seconds=30),
        record: str | Path | None = None,
        record_limit: int = DEFAULT_LIMIT,
    ) -> None:
        """``addresses``: what the broker dials back (a list, or a callable read at each
        registration); by default the listen addresses of the node :meth:`attach` gave. No
        ACME order is placed while none of them is one the broker could dial (public ones;
        private ones too with ``allow_private_addresses``): the order waits in Registered,
        and ``autotls status`` says why. ``registration_delay`` (Kubo's
        ``AutoTLS.RegistrationDelay``): no order before this long after :meth:`start`.
        ``record``: a directory to write each order's transcript to (off by default)."""
        self.identity = identity
        self.peer_id = identity.peer_id.to_base36()
        self.domain = wildcard_name(self.peer_id, zone)
        self.zone = zone
        self.data_dir = Path(data_dir)
        self.database_url = database_url or f"sqlite:///{self.data_dir / DATABASE_FILE}"
        self._addresses = DialBackAddresses(addresses)
        self.allow_private_addresses = allow_private_addresses
        self.clock = clock or SystemClock()
        self.settings = settings or EngineSettings()
        if zone != self.settings.zone:
            self.settings = replace(self.settings, zone=zone)
        if registration_delay is not None:
            if registration_delay < timedelta(0):
                raise ConfigurationError("registration_delay must not be negative")
            self.settings = replace(self.settings, registration_delay=registration_delay)
        # When this node came up, as far as AutoTLS can tell: start() sets it.
        self._online_since: datetime | None = None
        roots = resolve_trust_roots(trust_roots)
        self._http_observers = ServiceObservers()
        self.acme = AcmeAdapter(
            directory_url,
            ca_file=ca_file,
            eab=eab,
            contact=contact,
            preferred_chain=preferred_chain,
            trust_roots=roots,
            clock=self.clock,
            observer=self._http_observers.of("acme"),
            directory_cache=self.data_dir / DIRECTORY_CACHE_FILE,
        )
        self.broker = BrokerAdapter(
            identity=lambda peer: self.identity if peer == self.peer_id else None,
            addresses=lambda _peer: self.addresses(),
            online_since=lambda _peer: self._online_since,
            base_url=broker_url,
            ca_file=broker_ca_file,
            forge_auth=forge_auth,
            allow_private_addresses=allow_private_addresses,
            observer=self._http_observers.of("broker"),
            clock=self.clock,
        )
        self.dns = AuthoritativeTxtChecker(
            zone=zone,
            nameservers=[parse_nameserver(s) for s in dns_servers] if dns_servers else None,
            clock=self.clock,
        )
        self.installer = Installer(self.data_dir, trust_roots=roots, clock=self.clock)
        self.tls = LiveTlsContext()
        self._profile = profile
        self._run_worker = run_worker
        self._check_directory = check_directory
        self.store_poll = store_poll
        self._recorder: Recorder | None = None
        if record is not None:
            # loaded only for --record: the recorder and replay are not needed otherwise
            from autotls.recording import Recorder
            from autotls.recording.sanitize import configured_secrets

            self._recorder = Recorder(
                record,
                limit=record_limit,
                secrets=configured_secrets(forge_auth, eab.hmac_key if eab else None),
            )
            self.observe_http(self._recorder.observe_http)
        self._subscribers = Subscribers()
        self._serving = ServedCertificate(
            self.peer_id, self.domain, self.installer, self.tls, self._subscribers
        )
        self._store: Store | None = None
        self._worker: Worker | None = None
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._changes = Signal()  # every commit, refresh and worker end
        self._failed: Failure | None = None
        self._worker_error: BaseException | None = None
        self.order_id: int | None = None

    # -- public surface ---------------------------------------------------------------------

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """A server context that always holds the newest certificate (a self-signed
        placeholder until the first one is issued)."""
        return self.tls.context

    @property
    def certificate(self) -> CertificateInfo | None:
        """The certificate being served, while it is valid: ``None`` before the first one,
        once it expired, and once it is known to be revoked."""
        return self._serving.valid(self.clock.now())

    @property
    def served_certificate(self) -> CertificateInfo | None:
        """The certificate new handshakes get, also once it expired or was revoked (until its
        replacement arrives): what monitoring watches. :attr:`certificate` is the one to
        announce."""
        return self._serving.current

    @property
    def worker_running(self) -> bool:
        """Whether this object's worker is at work: False before :meth:`start`, after
        :meth:`stop`, once it stopped by itself (:attr:`worker_error` says why), and with
        ``run_worker=False``."""
        return self._task is not None and not self._task.done()

    def observe_http(self, observer: ServiceObserver) -> None:
        """Call ``observer(service, exchange)`` for every HTTP exchange with the ACME server
        (``service`` ``"acme"``) and the broker (``"broker"``), answered or failed; request
        metrics hook in here (:mod:`autotls.metrics`). It runs inside the request path: keep
        it quick, and never write down the exchange's secrets (:class:`autotls.http.Exchange`)."""
        self._http_observers.add(observer)

    @property
    def store(self) -> Store:
        if self._store is None:
            raise NotStartedError("AutoTLS is not started")
        return self._store

    @property
    def acme_requests(self) -> int:
        return self.acme.request_count

    def attach(self, node: ListeningNode) -> None:
        """Register ``node``'s listen addresses with the broker (read at each registration,
        ``0.0.0.0`` / ``::`` expanded to this machine's interface addresses), unless
        ``addresses`` was given. ``Libp2pNode(..., autotls=auto)`` calls it."""
        self._addresses.node = node

    def addresses(self) -> list[str]:
        """What the broker is told to dial back."""
        return self._addresses()

    def forge_addresses(self, addresses: Sequence[str] | None = None) -> list[str]:
        """The ``*.libp2p.direct`` addresses to announce: only while a valid cert is held."""
        if self.certificate is None:
            return []
        return forge_addresses(
            self.addresses() if addresses is None else addresses, self.peer_id, zone=self.zone
        )

    def advertised_addresses(self) -> list[str]:
        """The forge addresses a node advertises next to its own (identify ``listenAddrs``,
        signed peer records): ``/dns4|dns6/<ip-label>.<peer>.<zone>/tcp/<P>/tls/ws``, the form
        browsers dial, for every secure WebSocket address that is public (private ones too with
        ``allow_private_addresses``), while a valid certificate that was not revoked is held;
        empty otherwise. ``Libp2pNode(..., autotls=auto)`` wires it up.

        It reads the clock and the current certificate on every call, so expiry, renewal and
        revocation show at the next identify without a restart; it only reads, so the node may
        call it from its own thread."""
        if self.certificate is None:
            return []
        return advertised_forge_addresses(
            self.addresses(),
            self.peer_id,
            allow_private=self.allow_private_addresses,
            zone=self.zone,
        )

    @overload
    def on(self, event: Literal["loaded", "renewed"], callback: CertificateCallback) -> None: ...

    @overload
    def on(self, event: Literal["failed"], callback: FailureCallback) -> None: ...

    @overload
    def on(self, event: Literal["transition"], callback: TransitionCallback) -> None: ...

    def on(self, event: EventName, callback: Callable[[Any], Awaitable[None] | None]) -> None:
        """``loaded``/``renewed`` get a :class:`CertificateInfo`, ``failed`` a :class:`Failure`,
        ``transition`` an :class:`autotls.OrderEvent`. ``loaded``/``renewed`` fire once the
        certificate is recorded as Installed; new handshakes already get it by then."""
        self._subscribers.add(event, callback)

    async def order(self) -> OrderSnapshot:
        if self.order_id is None:
            raise NotStartedError("AutoTLS is not started")
        return await self.store.get_order(self.order_id)

    @property
    def worker_error(self) -> BaseException | None:
        """Why the worker stopped by itself (the database stayed unusable), if it did."""
        return self._worker_error

    async def wait_for_certificate(
        self, *, deadline: datetime | None = None, settled: bool = False
    ) -> CertificateInfo:
        """Until a valid certificate is served (installed by this process or, through the
        store, by another one). With ``settled``, also until the order is Installed: a
        renewal in flight (due, forced, after a revocation) is waited for, although the
        certificate it replaces is still valid -- what ``autotls run --once`` does, so that a
        timer running it renews. Raises :class:`IssuanceFailed` if the order fails
        permanently, the worker's error if it stopped (e.g.
        :class:`~autotls.persistence.errors.StoreUnavailableError`), and
        :class:`DeadlineExceeded` once ``deadline`` (on this object's clock) has passed or
        the order's next attempt is scheduled after it; the order stays persisted, so the
        next start resumes it."""
        sleeper: asyncio.Task[None] | None = None
        if deadline is not None:
            sleeper = asyncio.ensure_future(self.clock.sleep_until(deadline))
        try:
            while True:
                changed = self._changes.next()
                try:
                    cert = self.certificate
                    if cert is not None and not settled:
                        return cert
                    if self._worker_error is not None:
                        raise self._worker_error
                    snap = await self.order()
                    if cert is not None and snap.state == State.INSTALLED.value:
                        return cert
                    if snap.state == State.FAILED.value:
                        raise IssuanceFailed(self._failed or Failure.of_order(snap))
                    if deadline is not None and (
                        self.clock.now() >= deadline or snap.next_run_at > deadline
                    ):
                        raise DeadlineExceeded(snap, deadline)
                    waiting: set[asyncio.Future[Any]] = {changed}
                    if sleeper is not None:
                        waiting.add(sleeper)
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
        finally:
            if sleeper is not None:
                sleeper.cancel()

    async def wait_stopped(self) -> None:
        """Until the worker stops by itself: it gives up when the database stays unusable,
        and this raises that error. (``stop()`` never raises it.)"""
        while self._worker_error is None:
            await self._changes.next()
        raise self._worker_error

    async def renew_now(self) -> None:
        """Renew the installed certificate now (``replaces`` it when the CA offers ARI).
        The served certificate changes once the new one is installed. Raises
        :class:`~autotls.persistence.errors.OrderStateError` when the order is not Installed,
        :class:`~autotls.persistence.errors.OrderBusyError` when another process kept it
        longer than a lease."""
        give_up = self.clock.now() + self.worker.lease
        while True:
            # Taken before the attempt: a commit between the refusal and the wait still wakes us.
            changed = self._changes.next()
            try:
                snap = await self.order()
                try:
                    await operator.force_renewal(
                        self.store, snap.id, now=self.clock.now(), actor=f"autotls:{os.getpid()}"
                    )
                    break
                except (OrderBusyError, OrderStateError):
                    # A worker may hold the order for a moment (ours serves the certificate,
                    # and wait_for_certificate returns, just before its Installed commit), or
                    # claim it between our read and our write: wait for its next commit, or
                    # the end of its lease, while that can be the reason.
                    current = await self.order()
                    now = self.clock.now()
                    until = current.lease_until
                    held = until is not None and until > now
                    settling = held or current.state in (State.FINALIZED, State.INSTALLED)
                    if not settling or now >= give_up:
                        raise
                    await self._next_change(changed, min(until, give_up) if until else give_up)
            finally:
                changed.cancel()
        self.worker.wake()

    async def _next_change(self, changed: asyncio.Future[None], until: datetime) -> None:
        """Until ``changed`` (a commit, a refresh) or ``until`` on this object's clock (the
        end of a lease, or the moment to give up)."""
        sleeper = asyncio.ensure_future(self.clock.sleep_until(until))
        try:
            await asyncio.wait({changed, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> AutoTLS:
        self._online_since = self.clock.now()
        prepare_data_dir(self.data_dir)
        if self._recorder is not None:
            self._recorder.prepare()
        self._store = await Store.open(self.database_url)
        try:
            self.installer.subscribe(self._serving.on_install)
            await self.refresh(announce=True)
            self.installer.serve(self.peer_id, self.tls, load_existing=not self.tls.loaded)
            if not self.tls.loaded:
                self.tls.load_placeholder(self.domain, now=self.clock.now())
            if self._check_directory:
                await self._check_acme_directory()
            snapshot = await operator.resume_or_create(
                self._store,
                self.peer_id,
                self.domain,
                now=self.clock.now(),
                actor=f"autotls:{os.getpid()}",
            )
            self.order_id = snapshot.id
            ports = Ports(
                acme=self.acme,
                broker=self.broker,
                dns=self.dns,
                installer=self.installer,
                clock=self.clock,
                settings=self._settings_with_profile(),
            )
            if self._recorder is not None:
                ports = self._recorder.wrap(ports)
            self._worker = Worker(
                self._store,
                ports,
                peers={self.peer_id},
                idle_poll=self.store_poll,
                step_observer=self._recorder,
            )
            self._worker.subscribe(self._on_event)
            if self._run_worker:
                self._stop.clear()
                self._worker_error = None
                self._task = asyncio.create_task(self._worker.run(self._stop), name="autotls")
                self._task.add_done_callback(self._worker_ended)
            self._watcher = asyncio.create_task(
                watch_store(
                    self._store,
                    self.clock,
                    self.store_poll,
                    peer_id=self.peer_id,
                    own_actor=self._worker.id,
                    refresh=self.refresh,
                ),
                name="autotls-store",
            )
        except BaseException:
            await self._close_clients()
            raise
        log.info(
            "AutoTLS for %s started (order %s, %s)",
            self.domain,
            self.order_id,
            snapshot.state,
            extra=order_fields(snapshot.id, self.peer_id, snapshot.state),
        )
        return self

    async def stop(self) -> None:
        self._stop.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        task, self._task = self._task, None
        if task is not None:
            # The worker's own error was reported (worker_error, wait_for_certificate).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close_clients()

    async def refresh(self, *, announce: bool = True) -> CertificateInfo | None:
        """Serve the newest valid certificate the store holds for this peer, when it is not
        the one served already: after a restart, and when another process (the one holding
        the order's lease) installed it. Rewrites missing or different files from the store
        (a failure to write them is a warning: the certificate is served from memory).
        Notes revocations recorded on the certificates' rows, and wakes everything waiting
        on the order (:meth:`wait_for_certificate`, :meth:`renew_now`: another process may
        have moved it or let go of its lease). Returns the newly served certificate, if any.
        Runs every ``store_poll`` by itself."""
        try:
            certificates = await self.store.certificates(peer_id=self.peer_id)
            return await self._serving.load_newest(
                certificates, now=self.clock.now(), announce=announce
            )
        finally:
            self._changes.notify()

    async def __aenter__(self) -> AutoTLS:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise NotStartedError("AutoTLS is not started")
        return self._worker

    # -- internals --------------------------------------------------------------------------

    def _settings_with_profile(self) -> EngineSettings:
        if self._profile is None:
            return self.settings
        return replace(self.settings, profile=self._profile)

    async def _close_clients(self) -> None:
        if self._recorder is not None:
            self._recorder.close()  # a step cut short by the stop is written now
        await self.acme.close()
        await self.broker.close()
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    async def _check_acme_directory(self) -> None:
        try:
            async with asyncio.timeout(DIRECTORY_CHECK_TIMEOUT_S):
                await self.acme.check_directory()
        except TimeoutError:
            log.warning(
                "ACME directory %s did not answer within %.0fs; going on without checking it",
                self.acme.directory_url,
                DIRECTORY_CHECK_TIMEOUT_S,
            )

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._worker_error = task.exception()
        log.error(
            "AutoTLS for %s stopped working: %s",
            self.domain,
            self._worker_error,
            extra=order_fields(self.order_id, self.peer_id, None),
        )
        self._changes.notify()

    async def _on_event(self, event: OrderEvent) -> None:
        if event.from_state == State.RENEW_DUE.value:
            # A renewal begins: an operator's revoke (recorded on the certificate's row with
            # the forced renewal) takes effect here at the latest.
            cert = (await self.order()).certificate
            if cert is not None and cert.revoked_at is not None:
                self._serving.note_revoked([cert])
        await self._subscribers.emit("transition", event)
        if event.trigger is Trigger.CERTIFICATE_INSTALLED:
            await self._serving.adopt_installed()
        if event.to_state != State.FAILED.value:
            self._failed = None
        elif event.from_state != State.FAILED.value:
            self._failed = Failure(event.order_id, event.error_class, event.message, event.problem)
            await self._subscribers.emit("failed", self._failed)
        self._changes.notify()
