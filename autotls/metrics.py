"""Prometheus metrics and a health check for an :class:`~autotls.service.AutoTLS` (issue 10 §3).

What this module owns, and nothing else: the metric names and what they mean, the collector
that reads them from a facade, the health verdict, and the aiohttp app (and the small server
``autotls run --metrics-listen`` starts) that serves both. Nothing else in autotls imports
``prometheus_client``: ``import autotls`` and the quick commands never load it.

The names are a contract (issue 10 §3)::

    autotls_certificate_expiry_timestamp_seconds{peer}   notAfter of the certificate served,
                                                          also once it expired or was revoked
    autotls_certificate_renewal_timestamp_seconds{peer}  when the renewal is planned (in the
                                                          CA's ARI window, else with 1/3 of
                                                          the lifetime left); stays in the
                                                          past while a renewal is under way
    autotls_orders{state}                                 this peer's orders in each state of
                                                          the machine (0 included)
    autotls_step_duration_seconds{state}                  histogram: how long each step took
    autotls_step_errors_total{state,error_class}          steps that ended in an error, by the
                                                          state they ran in and the error class
    autotls_acme_requests_total{endpoint,status}          ACME requests by request class
                                                          (newOrder, finalize...) and HTTP
                                                          status ("error": no answer arrived)
    autotls_broker_healthy                                1 when the broker last answered well,
                                                          0 when it was down or in trouble;
                                                          absent before the first contact

``{peer}`` is the base36 PeerId label of the DNS name (as ``autotls status`` shows it).

Where the numbers come from: every HTTP exchange with the CA and the broker passes the
facade's observer (:meth:`AutoTLS.observe_http`, on :mod:`autotls.http`'s hook); every commit
of the facade's worker is an :class:`~autotls.fsm.worker.OrderEvent` that carries how long
its step took; the certificate is the one the facade serves (memory). The order counts and
the planned renewal are read from the store -- two small queries (a ``GROUP BY`` over this
peer's orders, one order by id) -- after each of the worker's commits and, through
:func:`metrics_app`, before a scrape unless the last read is younger than ``max_age``
(1 s: a storm of scrapes costs one read, an ordinary 15 s scrape always sees the database).
A store that fails leaves the last values in place (and says so once in the log).

``/healthz`` answers 200 only while a valid certificate is served and the worker is at work,
503 otherwise, with a small JSON body that says why (:func:`check_health`; memory only, no
database read: it answers while the database is down).

Why aiohttp and not ``prometheus_client.start_http_server``: the collector's database reads
are async and run on the facade's loop, which a server thread could not await; the health
route would need a WSGI app of its own; and the server stops with the node instead of
leaving a thread behind. prometheus_client still renders the exposition (content
negotiation with OpenMetrics included).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from autotls.fsm.data import order_data, renewal_plan
from autotls.fsm.machine import State
from autotls.persistence.errors import describe_database_error
from autotls.service import AutoTLS

if TYPE_CHECKING:
    from autotls.fsm.worker import OrderEvent
    from autotls.http import Exchange
    from autotls.persistence.records import OrderSnapshot

__all__ = [
    "DEFAULT_MAX_AGE",
    "STEP_BUCKETS",
    "AutoTLSCollector",
    "Health",
    "MetricsServer",
    "check_health",
    "metrics_app",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE = 1.0
# Steps take milliseconds (a commit-only wait) to minutes (polling DNS propagation or an
# authorization at the CA's pace).
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class AutoTLSCollector(Collector):
    """The metrics of one facade, for any Prometheus registry::

        registry.register(AutoTLSCollector(autotls))

    Make it before :meth:`AutoTLS.start` to count the first requests too (it subscribes to
    the facade's HTTP exchanges and worker events when made). :meth:`collect` reads memory
    only, so a registry may be scraped from any thread; the store's numbers are as fresh as
    the last :meth:`refresh` (after every commit of the facade's worker, and before every
    scrape of :func:`metrics_app`)."""

    def __init__(self, autotls: AutoTLS, *, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.autotls = autotls
        self.max_age = max_age
        # Objects of prometheus_client that belong to no registry: this collector yields them.
        self._acme_requests = Counter(
            "autotls_acme_requests",
            "ACME requests by request class and HTTP status (error: no answer arrived).",
            ["endpoint", "status"],
            registry=None,
        )
        self._step_duration = Histogram(
            "autotls_step_duration_seconds",
            "How long each step of the order machine took, by the state it ran in.",
            ["state"],
            buckets=STEP_BUCKETS,
            registry=None,
        )
        self._step_errors = Counter(
            "autotls_step_errors",
            "Steps that ended in an error, by the state they ran in and the error class.",
            ["state", "error_class"],
            registry=None,
        )
        self._broker_healthy: bool | None = None
        self._orders: dict[str, int] | None = None
        self._renewal_at: datetime | None = None
        self._read_at: float | None = None
        self._store_failing = False
        self._lock = asyncio.Lock()
        autotls.observe_http(self._on_exchange)
        autotls.on("transition", self._on_transition)

    # -- what the facade reports ----------------------------------------------------------

    def _on_exchange(self, service: str, exchange: Exchange) -> None:
        cancelled = isinstance(exchange.error, asyncio.CancelledError)
        if service == "acme":
            status = str(exchange.status) if exchange.status is not None else "error"
            self._acme_requests.labels(exchange.request_class, status).inc()
        elif service == "broker" and not cancelled:  # our own stop says nothing of the broker
            status_code = exchange.status
            if exchange.request_class == "health":
                healthy = status_code is not None and 200 <= status_code < 300
            else:  # a registration leg: any answer but a fault or a rate limit is a live broker
                healthy = status_code is not None and status_code < 500 and status_code != 429
            self._broker_healthy = healthy

    async def _on_transition(self, event: OrderEvent) -> None:
        if event.step_seconds is not None:
            self._step_duration.labels(event.from_state).observe(event.step_seconds)
        if event.error_class is not None:
            self._step_errors.labels(event.from_state, event.error_class).inc()
        await self.refresh(force=True)

    async def refresh(self, *, force: bool = False) -> None:
        """Read the order counts and the planned renewal from the store, unless the last
        read is younger than ``max_age`` (``force``: read anyway). Never raises: a failing
        store keeps the last values (and is logged once, until it reads again)."""
        async with self._lock:
            now = time.monotonic()
            if not force and self._read_at is not None and now - self._read_at < self.max_age:
                return
            auto = self.autotls
            try:
                store = auto.store
            except RuntimeError:  # not started, or stopped: no database to read
                return
            try:
                counts = await store.count_by_state(peers=[auto.peer_id])
                order = await auto.order()
            except Exception as exc:
                if not self._store_failing:
                    reason = describe_database_error(exc)
                    log.warning("metrics: reading the store failed: %s", reason)
                self._store_failing = True
                return
            self._store_failing = False
            self._orders = counts
            self._renewal_at = planned_renewal(order)
            self._read_at = time.monotonic()

    # -- what Prometheus reads ------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The families without samples: a registry refuses a second collector of these
        names (one facade per registry)."""
        yield from self._gauges(samples=False)
        for metric in (self._acme_requests, self._step_duration, self._step_errors):
            yield from metric.describe()

    def collect(self) -> Iterable[Metric]:
        yield from self._gauges(samples=True)
        for metric in (self._acme_requests, self._step_duration, self._step_errors):
            yield from metric.collect()

    def _gauges(self, *, samples: bool) -> Iterator[Metric]:
        peer = self.autotls.peer_id
        expiry = GaugeMetricFamily(
            "autotls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate served (Unix time), also once it expired.",
            labels=["peer"],
        )
        renewal = GaugeMetricFamily(
            "autotls_certificate_renewal_timestamp_seconds",
            "When the renewal of the certificate is planned (Unix time).",
            labels=["peer"],
        )
        orders = GaugeMetricFamily(
            "autotls_orders", "This peer's orders in each state.", labels=["state"]
        )
        broker = GaugeMetricFamily(
            "autotls_broker_healthy",
            "1 when the broker last answered well, 0 when it was down or in trouble.",
        )
        if samples:
            served = self.autotls.served_certificate
            if served is not None:
                expiry.add_metric([peer], served.not_after.timestamp())
            if self._renewal_at is not None:
                renewal.add_metric([peer], self._renewal_at.timestamp())
            if self._orders is not None:
                for state in State:
                    orders.add_metric([state.value], self._orders.get(state.value, 0))
            if self._broker_healthy is not None:
                broker.add_metric([], 1.0 if self._broker_healthy else 0.0)
        yield from (expiry, renewal, orders, broker)


def planned_renewal(order: OrderSnapshot) -> datetime | None:
    """When the Installed step planned the renewal (``renewal.renew_at`` in the order's
    data), if it did."""
    renewal = order_data(order.data)["renewal"]
    text = renewal_plan(renewal)["renew_at"] if isinstance(renewal, Mapping) else None
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# Health


@dataclass(frozen=True)
class Health:
    """The verdict of :func:`check_health`: ``body`` is the JSON ``/healthz`` answers."""

    healthy: bool
    reason: str | None
    body: dict[str, Any]

    @property
    def status(self) -> int:
        return 200 if self.healthy else 503


def check_health(autotls: AutoTLS) -> Health:
    """Healthy while a valid certificate is served (not expired, not revoked) and the
    facade's worker is at work. Reads memory only."""
    served = autotls.served_certificate
    valid = autotls.certificate
    running = autotls.worker_running
    reason: str | None = None
    if not running:
        error = autotls.worker_error
        reason = "the worker is not running" if error is None else f"the worker stopped: {error}"
    elif served is None:
        reason = "no certificate installed yet"
    elif valid is None:
        if served.not_after <= autotls.clock.now():
            reason = f"the certificate expired at {_iso(served.not_after)}"
        else:
            reason = f"the certificate {served.serial} was revoked"
    body: dict[str, Any] = {
        "status": "ok" if reason is None else "unavailable",
        "peer": autotls.peer_id,
        "worker": "running" if running else "not running",
        "certificate": None
        if served is None
        else {"serial": served.serial, "not_after": _iso(served.not_after)},
    }
    if reason is not None:
        body["reason"] = reason
    return Health(reason is None, reason, body)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# Serving


_FACADE = web.AppKey("autotls", AutoTLS)
_COLLECTOR = web.AppKey("autotls_collector", AutoTLSCollector)
_REGISTRY = web.AppKey("autotls_registry", CollectorRegistry)


def metrics_app(
    autotls: AutoTLS,
    *,
    collector: AutoTLSCollector | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """An aiohttp app with ``GET /metrics`` and ``GET /healthz`` for ``autotls``; mount it
    in your own server (``app.add_subapp("/autotls/", metrics_app(autotls))``) or serve it
    (:class:`MetricsServer`).

    ``collector`` is refreshed before each scrape (default: a new one for ``autotls``).
    ``registry`` is what ``/metrics`` serves (default: a new one holding ``collector`` and
    prometheus_client's process, platform and GC collectors); a registry you pass is served
    as it is: register the collector in it yourself."""
    if collector is None:
        collector = AutoTLSCollector(autotls)
    if registry is None:
        registry = CollectorRegistry()
        registry.register(collector)
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(standard)
    app = web.Application()
    app[_FACADE] = autotls
    app[_COLLECTOR] = collector
    app[_REGISTRY] = registry
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    return app


async def _metrics(request: web.Request) -> web.Response:
    await request.app[_COLLECTOR].refresh()
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    verdict = check_health(request.app[_FACADE])
    return web.json_response(verdict.body, status=verdict.status)


class MetricsServer:
    """:func:`metrics_app` served on ``host:port`` (``host`` None: every interface; port 0:
    one the system picks, see :attr:`addresses`). What ``autotls run --metrics-listen``
    starts; usable as ``async with``."""

    def __init__(
        self,
        autotls: AutoTLS,
        host: str | None,
        port: int,
        *,
        app: web.Application | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._app = app if app is not None else metrics_app(autotls)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; raises :class:`OSError` when the address cannot be bound."""
        # No access log: a line for every scrape would drown the node's own lines.
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs it listens on."""
        if self._runner is None:
            return []
        return [(str(name[0]), int(name[1])) for name in self._runner.addresses]

    @property
    def urls(self) -> list[str]:
        """``http://HOST:PORT`` for each address it listens on."""
        return [
            f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            for host, port in self.addresses
        ]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
