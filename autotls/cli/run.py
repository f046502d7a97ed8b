"""``autotls run`` and ``autotls demo``: the commands that run a node.

``run`` starts a py-libp2p node and an :class:`AutoTLS` on the settings that
:func:`autotls.cli.settings.node_settings` validated, reports the order's progress on
stderr and the certificate and addresses to announce on stdout, and stops cleanly on
SIGTERM (exit 0) or SIGINT (130), at any moment, starting included. The node advertises the
forge addresses in identify while a valid certificate is held. Without ``--once`` it runs
until stopped, or until its worker gives up on the database (exit 3). With ``--once`` it
exits as soon as the order is Installed with a valid certificate -- installed by this
process or, through the store, by another one for the same identity (0) -- or the order
failed for good (1), or the next attempt would come after ``--deadline`` (75; the order is
kept for the next run). With ``--metrics-listen`` it serves Prometheus metrics and a health
check (:mod:`autotls.metrics`). ``demo`` does the same on the local stack
(:mod:`autotls.demo`) and proves the certificate with a TLS handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from autotls.cli.exits import EXIT_INTERRUPTED, EXIT_OK, OperationFailed, UsageError
from autotls.cli.logs import quiet_libp2p
from autotls.cli.output import err, one_line, out, when
from autotls.cli.settings import ListenAddress, NodeSettings, node_settings

if TYPE_CHECKING:
    from autotls.cli.dispatch import Stop
    from autotls.fsm.worker import OrderEvent
    from autotls.metrics import MetricsServer
    from autotls.peerid import PrivateKey
    from autotls.service import AutoTLS, CertificateInfo, Failure

_T = TypeVar("_T")


async def cmd_demo(args: argparse.Namespace, stop: Stop) -> int:
    from autotls.demo import DEFAULT_WORKDIR, run_demo

    workdir: Path = args.workdir or DEFAULT_WORKDIR
    quiet_libp2p(args.verbose)
    result = await run_demo(workdir, progress=err, timeout_s=args.timeout)
    if args.json:
        out(json.dumps(result.as_json(), sort_keys=True))
    else:
        out(f"state:        {result.state}")
        out(f"tls_verified: {str(result.tls_verified).lower()}")
        out(f"peer:         {result.peer_id}")
        out(f"domain:       {result.domain}")
        if result.cert_path:
            out(f"certificate:  {result.cert_path} (valid until {result.not_after})")
        for index, address in enumerate(result.addresses):
            out(("addresses:    " if index == 0 else " " * 14) + address)
        out(f"acme requests {result.acme_requests}, {result.elapsed_s:.1f}s")
        if result.data_dir:
            out(f"next: autotls status --data-dir {result.data_dir}")
    if not result.ok:
        raise OperationFailed(f"demo failed: {result.error or result.state}")
    return EXIT_OK


async def cmd_run(args: argparse.Namespace, stop: Stop) -> int:
    settings = node_settings(args)
    quiet_libp2p(args.verbose)
    return await run_node(settings, stop, on_started=getattr(args, "on_started", None))


async def load_identity(path: Path) -> PrivateKey | None:
    """The identity key at ``path``, or None when nothing is there. A key file that group or
    others may read is refused (as OpenSSH refuses such a private key); a present but
    unreadable, oversized, non-regular (``/dev/zero``, a FIFO) or corrupt file raises
    :class:`PeerIdError` at once and is left exactly as it was. The file is looked at and
    read off the event loop, so signals are serviced meanwhile."""
    from autotls.peerid import load_private_key_async

    if not await asyncio.to_thread(_identity_present, path):
        return None
    return await load_private_key_async(path)


def _identity_present(path: Path) -> bool:
    """Whether there is something at ``path`` to load; refuses a regular key file that
    group or others may read. Anything else (a FIFO, a device, a dangling link, a
    directory) is left for the loader to name."""
    import os
    import stat

    from autotls.peerid import key_file_exposed

    try:
        info = os.stat(path)
    except FileNotFoundError:
        return path.is_symlink()
    except OSError:
        return True
    if stat.S_ISREG(info.st_mode) and key_file_exposed(path):
        raise UsageError(
            f"identity key {path} is readable by group or others: run `chmod 600 {path}`"
        )
    return True


class _Stopped(Exception):
    """A signal asked ``run`` to stop while it was still starting or waiting."""


async def _unless_stopped(stop: Stop, awaitable: Awaitable[_T]) -> _T:
    """``awaitable``'s result, or :class:`_Stopped` (once it is cancelled) as soon as a
    signal asks to stop: a node that hangs starting (a CA that never answers, a database
    that takes its time) still ends on SIGTERM."""
    task = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.event.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise _Stopped


async def run_node(
    settings: NodeSettings, stop: Stop, *, on_started: Callable[[], None] | None = None
) -> int:
    """Run the node until it is done (see :func:`_run_node`); ``on_started`` is called once the
    node and its worker are up (the process's garbage collector settles then, dispatch.py)."""
    with contextlib.suppress(_Stopped):
        await _run_node(settings, stop, on_started)
    if stop.signal_name is not None:
        err(f"stopped on {stop.signal_name}")
        if stop.signal_name == "SIGTERM" and not settings.once:
            return EXIT_OK
        return EXIT_INTERRUPTED
    return EXIT_OK


async def _run_node(
    settings: NodeSettings, stop: Stop, on_started: Callable[[], None] | None = None
) -> None:
    """Start the node and AutoTLS, then wait: for a certificate (``--once``: returns, or
    raises why there is none by the deadline), or for a stop request (returns) or the worker
    giving up on the database (raises it)."""
    from autotls.datadir import prepare_data_dir
    from autotls.node import Libp2pNode, NodeError
    from autotls.peerid import PrivateKey, save_private_key
    from autotls.persistence.urls import redact
    from autotls.service import AutoTLS, IssuanceFailed

    started = datetime.now(UTC)
    for note in settings.notes:
        err(f"autotls: note: {note}", level="warning")
    key = await _unless_stopped(stop, load_identity(settings.key_path))
    created = key is None
    if key is None:
        key = PrivateKey.generate()  # saved once the rest of the configuration is accepted

    # Without --announce, the broker is told the node's listen addresses (attach below), with
    # unspecified ones expanded to this machine's interface addresses.
    auto = AutoTLS(
        key,
        data_dir=settings.data_dir,
        addresses=settings.announce,
        database_url=settings.database_url,
        directory_url=settings.directory_url,
        ca_file=settings.ca_file,
        broker_url=settings.broker_url,
        broker_ca_file=settings.broker_ca_file,
        forge_auth=settings.forge_auth,
        dns_servers=settings.dns_servers,
        allow_private_addresses=settings.allow_private_addresses,
        registration_delay=settings.registration_delay,
        trust_roots=settings.trust_roots,
        eab=settings.eab,
        profile=settings.profile,
        contact=settings.contact,
        preferred_chain=settings.preferred_chain,
        store_poll=settings.store_poll,
        record=settings.record,
    )
    try:
        # Serves auto's context, advertises its forge addresses in identify while they are
        # valid, and registers its listen addresses with the broker.
        node = Libp2pNode(key, listen=settings.listen, autotls=auto)
    except NodeError as exc:
        raise UsageError(f"{exc}") from None
    # 0700; an existing directory others may write is refused (exit 2) before a key is saved.
    prepare_data_dir(settings.data_dir)
    if created:
        save_private_key(key, settings.key_path)
        err(f"generated a new identity key in {settings.key_path}")

    announce = _Announcer(auto, settings.allow_private_addresses)

    def on_failed(failure: Failure) -> None:
        if not settings.once:  # a service keeps serving what it has; say what to do
            err(
                _describe_failure(failure),
                level="error",
                order_id=failure.order_id,
                peer=auto.peer_id,
                state="Failed",
                error_class=failure.error_class,
            )

    auto.on("transition", _report_transition)
    auto.on("failed", on_failed)
    auto.on("loaded", lambda cert: announce.certificate(cert, "loaded"))
    auto.on("renewed", lambda cert: announce.certificate(cert, "renewed"))

    err(f"peer {key.peer_id.to_base58()} ({auto.peer_id})", peer=auto.peer_id)
    err(
        f"database {redact(settings.database_url)}, ACME {settings.directory_url}, "
        f"broker {settings.broker_url}"
    )
    await _unless_stopped(stop, node.start())
    metrics: MetricsServer | None = None
    try:
        if settings.metrics_listen is not None:
            metrics = await serve_metrics(auto, settings.metrics_listen)
        err(f"listening on {', '.join(node.listen_addresses)}")
        await _unless_stopped(stop, auto.start())
        if on_started is not None:
            on_started()
        try:
            if settings.once:
                deadline = started + settings.deadline
                try:
                    await _unless_stopped(
                        stop, auto.wait_for_certificate(deadline=deadline, settled=True)
                    )
                except IssuanceFailed as exc:
                    raise OperationFailed(_describe_failure(exc.failure)) from None
            else:
                await _unless_stopped(stop, auto.wait_stopped())
        finally:
            err("stopping")
            await auto.stop()
    finally:
        if metrics is not None:
            await metrics.stop()
        await node.stop()


async def serve_metrics(auto: AutoTLS, where: ListenAddress) -> MetricsServer:
    """``--metrics-listen``: ``/metrics`` and ``/healthz`` (:mod:`autotls.metrics`), started
    before the worker so that its first requests are counted."""
    from prometheus_client import disable_created_metrics

    from autotls.metrics import MetricsServer

    # The process is ours: no `*_created` series, which in the text format are only more
    # series to store (an embedder's process keeps prometheus_client's setting).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    server = MetricsServer(auto, where.host, where.port)
    try:
        await server.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"{where.given_by}: cannot listen on {where}: {reason}") from None
    urls = ", ".join(f"{url}/metrics" for url in server.urls)
    err(f"metrics on {urls} (health check: /healthz)")
    return server


def _describe_failure(failure: Failure) -> str:
    return (
        f"order {failure.order_id} failed ({failure.error_class}): {failure.message}; "
        f"fix the cause, then `autotls retry --order {failure.order_id}`"
    )


class _Announcer:
    """Prints the certificate and the forge addresses whenever a certificate is (re)loaded."""

    def __init__(self, auto: AutoTLS, allow_private: bool) -> None:
        self._auto = auto
        self._allow_private = allow_private

    def certificate(self, cert: CertificateInfo, how: str) -> None:
        from autotls.multiaddrs import select_dialable

        forged = self._auto.forge_addresses()
        shown = select_dialable(forged, allow_private=self._allow_private)
        out(
            f"certificate {how}: {cert.domain} serial {cert.serial}, valid until "
            f"{when(cert.not_after)}, {cert.chain_path}"
        )
        if shown:
            out("announce:")
            for address in shown:
                out(f"  {address}")
        else:
            out("announce: (no public secure WebSocket address; see --announce)")
        advertised = self._auto.advertised_addresses()
        if advertised:
            err(f"identify advertises {', '.join(advertised)}", peer=self._auto.peer_id)


def _report_transition(event: OrderEvent) -> None:
    where = f"order {event.order_id}"
    fields: dict[str, Any] = {
        "order_id": event.order_id,
        "peer": event.peer_id,
        "state": event.to_state,
    }
    if event.trigger is not None:
        err(
            f"{where}: {event.from_state} -> {event.to_state} ({event.trigger})",
            trigger=event.trigger,
            **fields,
        )
    elif event.error_class:
        retry = f", next attempt {when(event.next_run_at)}" if event.next_run_at else ""
        err(
            f"{where}: {event.from_state}: {event.error_class} error{retry}: "
            f"{one_line(event.message or '', 300)}",
            level="warning",
            error_class=event.error_class,
            **fields,
        )
