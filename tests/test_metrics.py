"""Prometheus metrics and the health check (issue 10 §3), scraped over real HTTP.

* ``autotls run --metrics-listen`` (a real process against the local stack): ``/healthz``
  answers 503 while the broker is down and the order waits, the scrape shows the broker
  unhealthy and the step errors; after a restart with the broker up it answers 200, and the
  scrape -- parsed with prometheus_client's own text parser -- carries every metric name with
  the values the database and the certificate file hold.
* The library: :class:`AutoTLSCollector` in a registry of the embedder's, :func:`metrics_app`
  mounted in the embedder's own aiohttp server; ``/healthz`` is 503 before start, 200 with a
  certificate, 503 after stop and 503 when the worker stops by itself (its database broke).
* The flag and its variable, and the one-line usage errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import prometheus_client
import pytest
from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import text

from autotls import AutoTLSCollector, MetricsServer, metrics_app
from autotls import cli as autotls_cli
from autotls.fsm.clock import ManualClock
from autotls.fsm.machine import State
from autotls.fsm.worker import OrderEvent
from autotls.localstack.stack import LocalStack
from autotls.persistence.errors import StoreUnavailableError
from autotls.persistence.store import Store
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_cli_e2e import (
    _dead_broker_url,
    components,  # noqa: F401 - a fixture
    finish,
    poll,
    read_order,
    run_argv,
    stack,  # noqa: F401 - a fixture
    stack_env,
    start_autotls,
    write_roots,
)
from tests.test_service import Setup, setup  # noqa: F401 - a fixture

METRIC_NAMES = {
    # family name as prometheus_client's parser gives it -> its type
    "autotls_certificate_expiry_timestamp_seconds": "gauge",
    "autotls_certificate_renewal_timestamp_seconds": "gauge",
    "autotls_orders": "gauge",
    "autotls_step_duration_seconds": "histogram",
    "autotls_step_errors": "counter",  # samples: autotls_step_errors_total
    "autotls_acme_requests": "counter",  # samples: autotls_acme_requests_total
    "autotls_broker_healthy": "gauge",
}
HAPPY_STATES = ("New", "Registered", "Challenged", "BrokerNotified", "DNSPropagated",
                "Validated", "Finalized", "Installed")  # fmt: skip


@dataclass
class Scrape:
    text: str

    def __post_init__(self) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def samples(self, name: str) -> list[Sample]:
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples(name) if s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def check_names(self) -> None:
        for name, kind in METRIC_NAMES.items():
            assert name in self.families, f"{name} missing from the scrape"
            assert self.families[name].type == kind, (name, self.families[name].type)


async def fetch(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, str]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    status, kind, body = await fetch(http, url)
    assert kind.startswith("application/json"), kind
    document: dict[str, Any] = json.loads(body)
    return status, document


async def scrape(http: aiohttp.ClientSession, base: str) -> Scrape:
    status, kind, body = await fetch(http, f"{base}/metrics")
    assert status == 200, body
    assert kind.startswith("text/plain; version=0.0.4"), kind
    return Scrape(body)


# -- autotls run --metrics-listen, a real process ------------------------------------------


async def served_at(process: asyncio.subprocess.Process) -> tuple[str, list[str]]:
    """The base URL from the ``metrics on http://HOST:PORT/metrics`` line on stderr (port 0
    was asked for), and the lines read up to it."""
    assert process.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while True:
            raw = await process.stderr.readline()
            if not raw:
                pytest.fail("autotls ended before serving metrics:\n" + "".join(lines))
            line = raw.decode()
            lines.append(line)
            if line.startswith("metrics on "):
                url = line.split()[2]
                assert url.endswith("/metrics") and line.rstrip().endswith("/healthz)"), line
                return url.removesuffix("/metrics"), lines


async def test_run_serves_metrics_and_health_before_and_after_issuance(
    stack: LocalStack,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "node"
    db = data_dir / "autotls.db"
    roots = write_roots(stack, tmp_path / "roots.pem")
    async with aiohttp.ClientSession() as http:
        # 1. The broker is down: the order waits in Registered (its health check fails before
        # any ACME order is placed), the node is not healthy.
        down = stack_env(stack, broker_url=_dead_broker_url())
        argv = run_argv(stack, data_dir, roots, "--metrics-listen", "127.0.0.1:0")
        process = await start_autotls(*argv, env=down)
        try:
            base, _ = await served_at(process)

            async def broker_failed() -> bool:
                snap = await read_order(db)
                return snap is not None and snap.state == "Registered" and snap.attempts > 0

            await poll(broker_failed, "a failed broker health check in Registered")
            status, body = await health(http, f"{base}/healthz")
            assert status == 503, body
            assert body["status"] == "unavailable" and body["worker"] == "running"
            assert body["reason"] == "no certificate installed yet"
            assert body["certificate"] is None and body["peer"]
            waiting = await scrape(http, base)
        finally:
            process.terminate()
        stopped = await finish(process)
        assert stopped.code == 0, stopped.err

        waiting.check_names()
        assert waiting.value("autotls_broker_healthy") == 0
        errors = waiting.value(
            "autotls_step_errors_total", state="Registered", error_class="transient"
        )
        assert errors is not None and errors >= 1
        assert waiting.value("autotls_orders", state="Registered") == 1
        assert waiting.value("autotls_orders", state="Installed") == 0
        assert waiting.samples("autotls_certificate_expiry_timestamp_seconds") == []
        assert waiting.value("autotls_acme_requests_total", endpoint="newAccount", status="201")
        # No order while the broker is down: no authorization clock runs for nothing.
        placed = waiting.value("autotls_acme_requests_total", endpoint="newOrder", status="201")
        assert placed is None
        for state in ("New", "Registered"):  # a state may take several steps
            count = waiting.value("autotls_step_duration_seconds_count", state=state)
            assert count is not None and count >= 1, state

        # 2. Restarted with the broker up (the address from the environment this time).
        env = {**stack_env(stack), "AUTOTLS_METRICS_LISTEN": "127.0.0.1:0"}
        process = await start_autotls(*run_argv(stack, data_dir, roots), env=env)
        try:
            base, _ = await served_at(process)

            async def healthy() -> bool:
                status, _ = await health(http, f"{base}/healthz")
                return status == 200

            await poll(healthy, "/healthz to answer 200")

            async def renewal_planned() -> bool:
                found = await scrape(http, base)
                return bool(found.samples("autotls_certificate_renewal_timestamp_seconds"))

            await poll(renewal_planned, "the planned renewal in the scrape")
            status, body = await health(http, f"{base}/healthz")
            installed = await scrape(http, base)
            snap = await read_order(db)
        finally:
            process.terminate()
        stopped = await finish(process)
        assert stopped.code == 0, stopped.err

    assert snap is not None and snap.state == "Installed"
    label = snap.peer_id
    leaf = x509.load_pem_x509_certificates(
        (data_dir / "certs" / label / "fullchain.pem").read_bytes()
    )[0]
    assert status == 200
    assert body == {
        "status": "ok",
        "peer": label,
        "worker": "running",
        "certificate": {
            "serial": format(leaf.serial_number, "x"),
            "not_after": leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        },
    }

    installed.check_names()
    expiry = installed.value("autotls_certificate_expiry_timestamp_seconds", peer=label)
    assert expiry == leaf.not_valid_after_utc.timestamp()
    renewal = installed.value("autotls_certificate_renewal_timestamp_seconds", peer=label)
    planned = datetime.fromisoformat(snap.data["renewal"]["renew_at"])
    assert renewal == planned.timestamp()
    assert leaf.not_valid_before_utc.timestamp() < renewal < expiry
    for state in State:
        expected = 1 if state is State.INSTALLED else 0
        assert installed.value("autotls_orders", state=state.value) == expected, state
    assert installed.value("autotls_broker_healthy") == 1
    acme = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for s in installed.samples("autotls_acme_requests_total")
    }
    assert acme[("finalize", "200")] == 1 and acme[("certificate", "200")] == 1
    assert acme[("challenge", "200")] >= 1
    # The directory: fetched (and counted) by the first process, read from the data
    # directory's cache by this one.
    fetched = waiting.value("autotls_acme_requests_total", endpoint="directory", status="200")
    assert fetched is not None and fetched >= 1
    assert ("directory", "200") not in acme
    assert acme[("newOrder", "201")] == 1  # placed by this process: the first one had none
    for state in ("Challenged", "BrokerNotified", "DNSPropagated", "Validated", "Finalized"):
        count = installed.value("autotls_step_duration_seconds_count", state=state)
        assert count is not None and count >= 1, state
        inf = installed.value("autotls_step_duration_seconds_bucket", state=state, le="+Inf")
        assert inf == count
    total = installed.value("autotls_step_duration_seconds_sum", state="Validated")
    assert total is not None and total > 0
    assert "PRIVATE KEY" not in installed.text
    assert "_created" not in installed.text  # the command line turns those series off


# -- the library: a collector in the embedder's registry, the app in the embedder's server ---


async def test_collector_in_a_custom_registry_and_the_app_mounted_in_a_server(
    setup: Setup,  # noqa: F811 - the fixture
) -> None:
    auto, node = setup.pair()
    registry = CollectorRegistry()
    collector = AutoTLSCollector(auto)  # before start: the first requests count too
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(AutoTLSCollector(auto))
    planned = asyncio.Event()  # the Installed step planned the renewal (and we refreshed)

    def on_transition(event: OrderEvent) -> None:
        if event.to_state == State.INSTALLED.value and event.trigger is None:
            planned.set()

    auto.on("transition", on_transition)

    outer = web.Application()  # the embedder's server, our app under /autotls/
    outer.add_subapp("/autotls/", metrics_app(auto, collector=collector, registry=registry))
    runner = web.AppRunner(outer)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/autotls"
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await health(http, f"{base}/healthz")
            assert (status, body["reason"]) == (503, "the worker is not running")
            async with node, auto:
                async with asyncio.timeout(60):
                    cert = await auto.wait_for_certificate()
                    await planned.wait()
                # No scrape through our app yet: the collector refreshed after each commit.
                own = Scrape(generate_latest(registry).decode())
                status, body = await health(http, f"{base}/healthz")
                assert status == 200 and body["certificate"]["serial"] == cert.serial
                kind = "application/openmetrics-text; version=1.0.0"
                status, content_type, openmetrics = await fetch(
                    http, f"{base}/metrics", Accept=kind
                )
                assert status == 200 and content_type.startswith("application/openmetrics-text")
                assert openmetrics.endswith("# EOF\n")
                assert 'autotls_orders{state="Installed"} 1.0' in openmetrics
            status, body = await health(http, f"{base}/healthz")
            assert (status, body["reason"]) == (503, "the worker is not running")
            assert body["certificate"]["serial"] == cert.serial  # still what it served
    finally:
        await runner.cleanup()

    own.check_names()
    peer = auto.peer_id
    assert auto.order_id is not None
    snap_id = auto.order_id
    expiry = own.value("autotls_certificate_expiry_timestamp_seconds", peer=peer)
    assert expiry == cert.not_after.timestamp()
    async with await Store.open(auto.database_url) as store:
        snap = await store.get_order(snap_id)
    planned_at = datetime.fromisoformat(snap.data["renewal"]["renew_at"])
    renewal = own.value("autotls_certificate_renewal_timestamp_seconds", peer=peer)
    assert renewal == planned_at.timestamp()
    assert own.value("autotls_orders", state="Installed") == 1
    assert own.value("autotls_broker_healthy") == 1
    assert own.value("autotls_acme_requests_total", endpoint="newOrder", status="201") == 1
    assert own.value("autotls_acme_requests_total", endpoint="newAccount", status="201") == 1
    for state in HAPPY_STATES:
        assert own.value("autotls_step_duration_seconds_count", state=state), state
    # prometheus_client's global registry is left alone
    assert "autotls_orders" not in {m.name for m in prometheus_client.REGISTRY.collect()}


async def test_health_turns_503_when_the_worker_stops_by_itself(
    setup: Setup,  # noqa: F811 - the fixture
) -> None:
    first, node = setup.pair()
    async with node, first:
        async with asyncio.timeout(60):
            cert = await first.wait_for_certificate()
    # A second start serves the stored certificate; its worker runs on a clock of our own.
    clock = ManualClock(datetime.now(UTC))
    auto = setup.autotls([], clock=clock, check_directory=False)
    async with auto, MetricsServer(auto, "127.0.0.1", 0) as server:
        (base,) = server.urls
        async with aiohttp.ClientSession() as http:
            status, body = await health(http, f"{base}/healthz")
            assert status == 200 and body["certificate"]["serial"] == cert.serial
            assert (await scrape(http, base)).value("autotls_orders", state="Installed") == 1
            # The database breaks under the running worker: every claim now fails.
            async with auto.store.engine.begin() as conn:
                await conn.execute(text("ALTER TABLE orders RENAME TO orders_gone"))
            stopped = asyncio.ensure_future(auto.wait_stopped())
            while not stopped.done():
                # Both the worker (idle, then backing off) and the store watcher sleep on
                # the clock: move it on, until the worker gives up.
                asleep = asyncio.ensure_future(clock.sleeping(2))
                await asyncio.wait({asleep, stopped}, return_when=asyncio.FIRST_COMPLETED)
                asleep.cancel()
                clock.advance(60)
            with pytest.raises(StoreUnavailableError):
                await stopped
            status, body = await health(http, f"{base}/healthz")
            assert status == 503 and body["worker"] == "not running"
            assert body["reason"].startswith("the worker stopped: database "), body
            assert "no such table: orders" in body["reason"]
            # /metrics still answers, with the last values it read from the store
            stale = await scrape(http, base)
            assert stale.value("autotls_orders", state="Installed") == 1


# -- the flag, its variable, its errors -----------------------------------------------------


def _settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str) -> Any:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    args = autotls_cli.build_parser().parse_args(["run", *argv])
    autotls_cli.apply_environment(args)
    return autotls_cli.node_settings(args)


@pytest.fixture
def no_autotls_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(autotls_cli.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


@pytest.mark.usefixtures("no_autotls_environment")
@pytest.mark.parametrize(
    ("given", "host", "port", "shown"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464, "127.0.0.1:9464"),
        ("[::1]:9464", "::1", 9464, "[::1]:9464"),
        (":9464", None, 9464, ":9464"),
        ("localhost:0", "localhost", 0, "localhost:0"),
        ("metrics.node.example:65535", "metrics.node.example", 65535, None),
    ],
)
def test_metrics_listen_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    given: str,
    host: str | None,
    port: int,
    shown: str | None,
) -> None:
    assert _settings(monkeypatch, tmp_path).metrics_listen is None  # off by default
    flagged = _settings(monkeypatch, tmp_path, "--metrics-listen", given).metrics_listen
    assert (flagged.host, flagged.port, flagged.given_by) == (host, port, "--metrics-listen")
    assert str(flagged) == (shown or given)
    monkeypatch.setenv("AUTOTLS_METRICS_LISTEN", given)
    from_env = _settings(monkeypatch, tmp_path).metrics_listen
    assert (from_env.host, from_env.port) == (host, port)
    assert from_env.given_by == "AUTOTLS_METRICS_LISTEN"
    # the flag wins over the variable
    assert _settings(monkeypatch, tmp_path, "--metrics-listen", ":1").metrics_listen.port == 1


@pytest.mark.usefixtures("no_autotls_environment")
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("9464", "no port"),
        ("localhost:http", "bad port 'http'"),
        ("127.0.0.1:65536", "bad port '65536'"),
        ("127.0.0.1:", "bad port ''"),
        ("::1:9464", "an IPv6 address goes in brackets"),
        ("[::1:9464", "an IPv6 address goes in brackets"),
        ("[fe80::zz]:9464", "'fe80::zz' is not an IPv6 address"),
        ("999.1.1.1:9464", "'999.1.1.1' is not an IPv4 address"),
        ("bad host:9464", "'bad host' is not a host name or address"),
        ("http://127.0.0.1:9464", "give the address, not a URL"),
    ],
)
def test_a_bad_metrics_listen_is_a_one_line_usage_error(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    value: str,
    fragment: str,
) -> None:
    flagged = run_cli(capsys, "run", "--metrics-listen", value, "--data-dir", tmp_path / "d")
    assert_one_line_error(flagged, 2, "--metrics-listen:", "is not HOST:PORT", fragment)
    monkeypatch.setenv("AUTOTLS_METRICS_LISTEN", value)
    from_env = run_cli(capsys, "run", "--data-dir", tmp_path / "d")
    assert_one_line_error(from_env, 2, "AUTOTLS_METRICS_LISTEN:", fragment)
    assert not (tmp_path / "d").exists()  # refused before anything was made


@pytest.mark.usefixtures("no_autotls_environment", "libp2p_installed")
def test_a_metrics_address_in_use_is_a_one_line_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            capsys, "run", "--metrics-listen", f"127.0.0.1:{port}", "--data-dir", tmp_path / "d",
            "--listen", "/ip4/127.0.0.1/tcp/0", "--broker", _dead_broker_url(),
        )  # fmt: skip
    assert result.code == 2, result.err
    assert result.error_line.startswith(
        f"autotls: error: --metrics-listen: cannot listen on 127.0.0.1:{port}: "
    ), result.error_line


# -- the deployment examples the README shows -------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"


def test_the_readme_shows_the_deployment_files_as_shipped() -> None:
    readme = (DEPLOY.parent.parent / "README.md").read_text()
    for name in ("autotls.service", "autotls.env"):
        assert (DEPLOY / name).read_text() in readme, f"README's {name} differs from the file"
    expressions = [
        line.split("expr:", 1)[1].strip()
        for line in (DEPLOY / "autotls-alerts.yml").read_text().splitlines()
        if line.strip().startswith("expr:")
    ]
    assert len(expressions) == 7
    for expression in expressions:  # in a Markdown table, | is written \|
        assert f"`{expression.replace('|', chr(92) + '|')}`" in readme, expression
    for name in METRIC_NAMES:
        assert name in readme


@pytest.mark.usefixtures("no_autotls_environment")
def test_the_example_environment_file_is_a_valid_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for line in (DEPLOY / "autotls.env").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, value)
    settings = _settings(monkeypatch, tmp_path)
    assert settings.announce == [
        "/ip4/203.0.113.7/tcp/4001",
        "/ip4/203.0.113.7/tcp/4002/tls/sni/*.libp2p.direct/ws",
    ]
    assert settings.directory_url == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert settings.data_dir == Path("/var/lib/autotls/staging")
    assert str(settings.metrics_listen) == "127.0.0.1:9464"
    assert settings.contact == ["mailto:ops@example.org"]
