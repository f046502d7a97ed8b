"""The ``autotls`` command line, in process: arguments, environment variables, exit codes,
one-line errors, key files, logging, and every database command against
SQLite databases made with the engine on fakes (orders Installed, Failed, waiting, corrupt).

The end-to-end runs (a real ``autotls run`` against the local stack, SIGTERM and resume, the
demo) are in ``test_cli_e2e.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from autotls import cli
from autotls.acme import jwk_thumbprint, load_account_key
from autotls.cli.exits import exit_code_for, scrub
from autotls.cli.logs import quiet_libp2p, stderr_logging
from autotls.cli.output import ORDER_FIELDS
from autotls.cli.run import load_identity
from autotls.cli.settings import parse_duration, secret_values
from autotls.fsm.diagrams import graphviz_available
from autotls.fsm.errors import MisconfiguredError
from autotls.fsm.machine import State
from autotls.peerid import PrivateKey, save_private_key
from autotls.persistence import schema
from autotls.persistence.urls import parse_database_url
from tests.fakes.ports import acme_problem
from tests.fixtures.components import component_missing
from tests.fixtures.engine import HAPPY_TRIGGERS, Engine


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = self.err.strip().splitlines()
        assert lines, "nothing on stderr"
        return lines[-1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> Result:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def arun_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> Result:
    """For async tests: the command runs its own event loop, so it gets a thread."""
    code = await asyncio.to_thread(cli.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("autotls: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No AUTOTLS_* variable leaks in from the developer's shell; defaults land in tmp_path."""
    for name in list(os.environ):
        if name.startswith(cli.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    yield


# -- arguments and exit codes ----------------------------------------------------------------


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    version = run_cli(capsys, "--version")
    assert version.code == 0 and version.out.strip() == "autotls 0.1.0"
    helped = run_cli(capsys, "--help")
    assert helped.code == 0
    for command in ("demo", "run", "status", "diagram", "db", "renew", "retry", "revoke"):
        assert command in helped.out
    assert "Exit codes" in helped.out and "75 run --once" in " ".join(helped.out.split())


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        ([], ["required"]),
        (["bogus"], ["invalid choice: 'bogus'"]),
        (["run", "--listen", "/ip4/1.2.3/tcp/1"], ["--listen:", "bad ip4 address '1.2.3'"]),
        (["run", "--announce", "/ip4/1.2.3.4/tcp/99999"], ["--announce:", "out of range"]),
        (["run", "--listen", "ip4/1.2.3.4/tcp/1"], ["--listen:", "malformed multiaddr"]),
        (["run", "--dns-server", "ns1.example.org:53"], ["--dns-server:", "not an IP address"]),
        (["run", "--dns-server", "127.0.0.1:0"], ["--dns-server:", "bad port"]),
        (["run", "--ca", "not a url"], ["--ca:", "is not an http(s) URL"]),
        (["run", "--broker", "ftp://broker.example"], ["--broker:", "not an http(s) URL"]),
        (["run", "--broker", "https://broker.example:http"], ["--broker:", "bad port"]),
        (["run", "--db", "mysql://db.example/autotls"], ["--db:", "unsupported database"]),
        (["run", "--db", "sqlite://"], ["--db:", "in-memory"]),
        (["run", "--staging", "--ca", "https://ca.example/dir"], ["give one"]),
        (["run", "--eab-kid", "kid-1"], ["needs both --eab-kid and --eab-hmac-key"]),
        (["run", "--eab-kid", "k", "--eab-hmac-key", "%%%"], ["--eab-hmac-key:", "base64url"]),
        (["run", "--contact", "me@example.org"], ["--contact:", "mailto:"]),
        (["run", "--ca-bundle", "/nonexistent/ca.pem"], ["--ca-bundle:", "cannot use"]),
        (["run", "--trust-roots", "/nonexistent/roots.pem"], ["--trust-roots:", "cannot read"]),
        (["status", "--jsn"], ["unrecognized arguments: --jsn"]),
        (["diagram", "--format", "png"], ["invalid choice: 'png'"]),
        (["demo", "--timeout", "-1"], ["must be positive"]),
        (["diagram", "--order", "x"], ["order id must be a number"]),
        (["renew", "--force", "--order", "0"], ["order id must be positive"]),
        (["retry"], ["--order"]),
        (["revoke", "--reason", "because"], ["invalid choice: 'because'"]),
        (["db"], ["required"]),
        (["account"], ["required"]),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]
) -> None:
    result = run_cli(capsys, *argv)
    assert_one_line_error(result, cli.EXIT_USAGE, *fragments)
    assert result.out == ""


def test_trust_roots_must_be_pem_certificates(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_text("not a certificate\n")
    result = run_cli(capsys, "run", "--trust-roots", roots)
    assert_one_line_error(result, 2, "--trust-roots:", "not a PEM certificate bundle")


# -- environment variables -------------------------------------------------------------------


def _settings(*argv: str) -> cli.NodeSettings:
    args = cli.build_parser().parse_args(["run", *argv])
    cli.apply_environment(args)
    return cli.node_settings(args)


def test_defaults_follow_xdg_data_home(tmp_path: Path) -> None:
    settings = _settings()
    data_dir = tmp_path / "xdg" / "autotls"
    assert settings.data_dir == data_dir
    assert settings.key_path == data_dir / "identity.key"
    assert settings.database_url == f"sqlite:///{data_dir / 'autotls.db'}"
    assert settings.listen == list(cli.DEFAULT_LISTEN)
    assert settings.directory_url == "https://acme-v02.api.letsencrypt.org/directory"
    assert settings.broker_url == "https://registration.libp2p.direct"
    assert settings.dns_servers is None and settings.announce is None
    assert not settings.allow_private_addresses and not settings.once


def test_environment_fills_what_flags_leave_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOTLS_LISTEN", "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/tcp/0/tls/ws")
    monkeypatch.setenv("AUTOTLS_DNS_SERVER", "127.0.0.1:5353 [::1]:53")
    monkeypatch.setenv("AUTOTLS_ALLOW_PRIVATE_ADDRESSES", "yes")
    monkeypatch.setenv("AUTOTLS_ONCE", "0")
    monkeypatch.setenv("AUTOTLS_STAGING", "true")
    monkeypatch.setenv("AUTOTLS_DATA_DIR", str(tmp_path / "env-data"))
    monkeypatch.setenv("AUTOTLS_CONTACT", "mailto:ops@example.org")
    monkeypatch.setenv("AUTOTLS_BROKER", "http://127.0.0.1:8080")
    settings = _settings()
    assert settings.listen == ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/ws"]
    assert settings.dns_servers == ["127.0.0.1:5353", "[::1]:53"]
    assert settings.allow_private_addresses and not settings.once
    assert settings.directory_url == "https://acme-staging-v02.api.letsencrypt.org/directory"
    # staging roots are in no system bundle: chains are then only checked for consistency
    assert settings.trust_roots == [] and settings.notes
    assert settings.data_dir == tmp_path / "env-data"
    assert settings.key_path == tmp_path / "env-data" / "identity.key"
    assert settings.contact == ["mailto:ops@example.org"]
    assert settings.broker_url == "http://127.0.0.1:8080"

    # a flag wins over its variable
    flagged = _settings("--dns-server", "10.0.0.53:53", "--data-dir", str(tmp_path / "flag"))
    assert flagged.dns_servers == ["10.0.0.53:53"]
    assert flagged.data_dir == tmp_path / "flag"
    assert flagged.listen == ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/ws"]


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("AUTOTLS_STAGING", "maybe", "AUTOTLS_STAGING='maybe': expected 1/0"),
        ("AUTOTLS_DNS_SERVER", "dns.example:53", "AUTOTLS_DNS_SERVER: DNS server"),
        ("AUTOTLS_LISTEN", "/ip4/0.0.0.0/tcp/x", "AUTOTLS_LISTEN: malformed multiaddr"),
        ("AUTOTLS_CA", "acme.example/directory", "AUTOTLS_CA: 'acme.example/directory'"),
        ("AUTOTLS_DB", "oracle://db/x", "AUTOTLS_DB: unsupported database"),
    ],
)
def test_bad_environment_values_name_the_variable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    fragment: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert_one_line_error(run_cli(capsys, "run"), 2, fragment)


def test_database_commands_read_the_environment_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AUTOTLS_DATA_DIR", str(tmp_path / "from-env"))
    missing = run_cli(capsys, "status")
    assert_one_line_error(missing, 3, str(tmp_path / "from-env" / "autotls.db"))
    monkeypatch.setenv("AUTOTLS_DB", str(tmp_path / "explicit.db"))
    assert_one_line_error(run_cli(capsys, "status"), 3, str(tmp_path / "explicit.db"))


# -- key files ---------------------------------------------------------------------------------


async def test_a_missing_key_reads_as_none_and_a_present_one_loads(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    assert await load_identity(path) is None
    assert not path.exists()
    key = PrivateKey.generate()
    save_private_key(key, path)
    loaded = await load_identity(path)
    assert loaded is not None and loaded.peer_id == key.peer_id


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        (["/ip4/127.0.0.1/udp/4001/quic-v1"], "unsupported listen address"),
        (["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/tls/ws"], "share a port"),
        (["/ip4/127.0.0.1/tcp/4001/ws"], "plain WebSocket"),
    ],
)
def test_listen_addresses_the_node_cannot_serve_are_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, listen: list[str], fragment: str
) -> None:
    data_dir = tmp_path / "node"
    result = run_cli(capsys, "run", "--data-dir", data_dir, "--listen", *listen)
    assert_one_line_error(result, 2, fragment)
    assert not data_dir.exists()  # no key generated, no database created


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x08\x01\x12\x05short", "identity.key"),
        (b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n", "identity.key"),
        (b"   \n", "identity key file is empty"),
    ],
)
def test_a_corrupt_key_is_an_error_and_left_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, fragment: str
) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    key = data_dir / "identity.key"
    key.write_bytes(content)
    os.chmod(key, 0o600)
    before = key.stat()
    result = run_cli(capsys, "run", "--data-dir", data_dir, "--listen", "/ip4/127.0.0.1/tcp/0")
    assert_one_line_error(result, 2, fragment)
    assert key.read_bytes() == content
    assert key.stat().st_mtime_ns == before.st_mtime_ns and key.stat().st_ino == before.st_ino
    assert not (data_dir / "autotls.db").exists()  # nothing started


def test_a_key_path_that_is_a_directory_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "keydir").mkdir()
    result = run_cli(capsys, "run", "--data-dir", tmp_path, "--key", tmp_path / "keydir")
    assert_one_line_error(result, 2, "keydir", "directory")


def test_an_ecdsa_identity_is_refused_before_listening(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from autotls.peerid import KeyType

    key = tmp_path / "ecdsa.key"
    save_private_key(PrivateKey.generate(KeyType.ECDSA), key)
    result = run_cli(capsys, "run", "--data-dir", tmp_path, "--key", key)
    assert_one_line_error(result, 2, "ECDSA")
    assert not (tmp_path / "autotls.db").exists()


def test_a_key_readable_by_others_is_refused_with_the_chmod_that_fixes_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    key = data_dir / "identity.key"
    save_private_key(PrivateKey.generate(), key)
    content = key.read_bytes()
    for mode in (0o640, 0o604):
        os.chmod(key, mode)
        result = run_cli(capsys, "run", "--data-dir", data_dir, "--listen", "/ip4/127.0.0.1/tcp/0")
        assert_one_line_error(
            result, 2, f"identity key {key} is readable by group or others: run `chmod 600 {key}`"
        )
        assert key.read_bytes() == content and stat.S_IMODE(key.stat().st_mode) == mode
        assert not (data_dir / "autotls.db").exists()


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda _tmp: Path("/dev/zero"), "character device"),
        (lambda _tmp: Path("/dev/urandom"), "character device"),
        (lambda tmp: _fifo(tmp / "key.fifo"), "FIFO"),
    ],
    ids=["dev-zero", "dev-urandom", "fifo"],
)
async def test_a_key_that_is_not_a_file_is_one_line_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make: object, kind: str
) -> None:
    key = make(tmp_path)  # type: ignore[operator]
    # A key read that blocks (a FIFO without a writer) or never ends (/dev/zero) would hang
    # here: the bound turns that into a failure instead of a stuck suite.
    result = await asyncio.wait_for(
        arun_cli(capsys, "run", "--data-dir", tmp_path / "node", "--key", key), 60
    )
    assert_one_line_error(result, 2, str(key), f"not a regular file ({'a ' + kind})")
    assert not (tmp_path / "node" / "autotls.db").exists()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_data_directory_others_may_write_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mode: int
) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    os.chmod(data_dir, mode)
    result = run_cli(capsys, "run", "--data-dir", data_dir, "--listen", "/ip4/127.0.0.1/tcp/0")
    assert_one_line_error(result, 2, "refusing the data directory", str(data_dir), "chmod")
    assert list(data_dir.iterdir()) == []  # no key generated, no database created
    assert stat.S_IMODE(data_dir.stat().st_mode) == mode  # and its mode is the operator's


def test_a_new_data_directory_is_private_whatever_the_umask(
    libp2p_installed: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "a" / "b"
    with socket.socket() as taken:  # the node cannot listen here: it stops right after
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        previous = os.umask(0)
        try:
            result = run_cli(
                capsys, "run", "--data-dir", data_dir, "--listen", f"/ip4/127.0.0.1/tcp/{port}"
            )
        finally:
            os.umask(previous)
    assert result.code == 1
    assert result.error_line.startswith(
        f"autotls: error: could not listen on /ip4/127.0.0.1/tcp/{port}"
    )
    for directory in (tmp_path / "a", data_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE((data_dir / "identity.key").stat().st_mode) == 0o600


# -- run --once --deadline ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("500ms", 0.5), ("1.5s", 1.5),
     ("2d", 172800), (" 10M ", 600)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0", "-5s", "10x", "m", "1h 30m", "s10", "nan", "inf"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_deadline_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _settings("--once").deadline == timedelta(minutes=10)  # the default
    assert _settings("--once", "--deadline", "45s").deadline == timedelta(seconds=45)
    assert _settings().store_poll == timedelta(seconds=30)
    assert _settings("--store-poll", "1h").store_poll == timedelta(hours=1)
    assert_one_line_error(run_cli(capsys, "run", "--once", "--deadline", "soon"), 2,
                          "--deadline: 'soon' is not a duration")  # fmt: skip
    assert_one_line_error(run_cli(capsys, "run", "--deadline", "5m"), 2,
                          "--deadline applies to --once only")  # fmt: skip
    monkeypatch.setenv("AUTOTLS_DEADLINE", "2m")
    assert _settings("--once").deadline == timedelta(minutes=2)
    assert _settings().deadline == timedelta(minutes=2)  # a shared environment is no mistake
    monkeypatch.setenv("AUTOTLS_DEADLINE", "later")
    assert_one_line_error(run_cli(capsys, "run", "--once"), 2, "AUTOTLS_DEADLINE: 'later'")
    monkeypatch.delenv("AUTOTLS_DEADLINE")
    monkeypatch.setenv("AUTOTLS_STORE_POLL", "0s")
    assert_one_line_error(run_cli(capsys, "run"), 2, "AUTOTLS_STORE_POLL:", "positive")


async def test_a_missed_deadline_exits_75_and_says_the_order_is_kept(engine: Engine) -> None:
    from autotls.service import DeadlineExceeded

    order = await engine.order()
    deadline = engine.clock.now() + timedelta(minutes=10)
    code, message = exit_code_for(DeadlineExceeded(order, deadline))
    assert code == cli.EXIT_TEMPFAIL == 75
    assert message.startswith(f"order {order.id} is New; its next attempt at ")
    assert message.endswith("; the order is kept; the next run resumes it")


# -- logging and secrets -----------------------------------------------------------------------


def test_libp2p_logs_are_routed_and_silenced(
    libp2p_installed: None, capsys: pytest.CaptureFixture[str]
) -> None:
    libp2p_logger = logging.getLogger("libp2p")
    saved = (libp2p_logger.propagate, libp2p_logger.level)
    root_handlers = list(logging.getLogger().handlers)
    try:
        with stderr_logging(0):
            quiet_libp2p(0)
            assert libp2p_logger.propagate is True
            assert libp2p_logger.level == logging.CRITICAL
            # a py-libp2p module that sets its own level (auto_connector sets INFO)
            chatty = logging.getLogger("libp2p.network.auto_connector")
            chatty.info("AUTO_CONNECTOR_STATE: noise")
            logging.getLogger("libp2p.stream_muxer").warning("multiselect handshake failed")
            logging.getLogger("autotls.test").warning("disk almost full")
            logging.getLogger("transitions.core").info("Entered state Registered")
        err = capsys.readouterr().err
        assert "noise" not in err and "multiselect" not in err and "Entered" not in err
        assert "autotls: WARNING: disk almost full" in err
        assert logging.getLogger().handlers == root_handlers
        with stderr_logging(1):
            quiet_libp2p(1)
            logging.getLogger("libp2p.stream_muxer").warning("multiselect handshake failed")
        assert "multiselect handshake failed" in capsys.readouterr().err
    finally:
        libp2p_logger.propagate, _ = saved
        libp2p_logger.setLevel(saved[1])


@pytest.mark.parametrize(
    ("argv", "variable", "fragment"),
    [
        (["--log-format", "xml"], None, "--log-format: 'xml' is not a log format (human or json)"),
        ([], "text", "AUTOTLS_LOG_FORMAT: 'text' is not a log format"),
    ],
)
def test_bad_log_formats(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    variable: str | None,
    fragment: str,
) -> None:
    if variable is not None:
        monkeypatch.setenv("AUTOTLS_LOG_FORMAT", variable)
    assert_one_line_error(run_cli(capsys, "run", *argv), 2, fragment)


def test_json_lines_carry_the_order_fields_and_never_a_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from autotls.cli.output import err

    key_pem = PrivateKey.generate().to_pem().decode()  # a PKCS#8 "PRIVATE KEY" block
    with stderr_logging(0, "json"):
        logging.getLogger("autotls.worker").warning(
            "order %s: transient in %s", 7, "Challenged",
            extra={"order_id": 7, "peer": "k51peer", "state": "Challenged",
                   "trigger": None, "error_class": "transient"},
        )  # fmt: skip
        logging.getLogger("aiosqlite").warning("executing (%r,)", key_pem)
        logging.getLogger("autotls.test").info("below the default level: not shown")
        err("order 7: New -> Registered (account_ready)", order_id=7, state="Registered",
            trigger="account_ready")  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(records) == 3, lines
    worker, library, progress = records
    assert worker["level"] == "warning" and worker["logger"] == "autotls.worker"
    assert worker["message"] == "order 7: transient in Challenged"
    assert (worker["order_id"], worker["peer"], worker["state"], worker["error_class"]) == (
        7, "k51peer", "Challenged", "transient",
    )  # fmt: skip
    assert "trigger" not in worker  # absent fields are left out, not null
    assert worker["time"].endswith("Z")
    assert "PRIVATE KEY" not in library["message"]
    assert "[redacted private key]" in library["message"]
    assert key_pem.splitlines()[1] not in "\n".join(lines)
    assert progress["logger"] == "autotls.cli" and progress["trigger"] == "account_ready"
    # the human format is back once the command is over
    err("plain")
    assert capsys.readouterr().err == "plain\n"


async def test_worker_lines_about_an_order_carry_its_fields(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    from autotls.fsm.errors import TransientError

    order = await engine.order()
    engine.broker.fail(TransientError("broker could not dial the node back"))
    with caplog.at_level(logging.DEBUG, logger="autotls.worker"):
        await engine.drive_to(order.id, State.INSTALLED)
    about_orders = [r for r in caplog.records if r.getMessage().startswith("order ")]
    assert len(about_orders) >= len(HAPPY_TRIGGERS)
    for record in about_orders:
        fields = {name: getattr(record, name, None) for name in ORDER_FIELDS}
        assert fields["order_id"] == order.id, record.getMessage()
        assert fields["peer"] == order.peer_id and fields["state"], record.getMessage()
    transient = [r for r in about_orders if getattr(r, "error_class", None) == "transient"]
    assert len(transient) == 1 and transient[0].state == "Challenged"  # type: ignore[attr-defined]
    moves = [getattr(r, "trigger", None) for r in about_orders]
    assert [t for t in moves if t] == HAPPY_TRIGGERS[1:]


def test_the_human_format_filters_keys_too(capsys: pytest.CaptureFixture[str]) -> None:
    key_pem = PrivateKey.generate().to_pem().decode()
    with stderr_logging(2):
        logging.getLogger("sqlalchemy.engine.Engine").debug("Row (1, %r)", key_pem)
    seen = capsys.readouterr().err
    assert "Row (1, '[redacted private key]" in seen and "PRIVATE KEY" not in seen


def test_libp2p_lines_on_the_root_logger_are_silenced_too(
    libp2p_installed: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """py-libp2p's swarm connection logs its warnings on the *root* logger
    (``logging.warning``), past every ``libp2p`` logger's level: real code of it, here."""
    from libp2p.network.connection.swarm_connection import SwarmConn

    class Unhookable:  # no room for the hooks SwarmConn attaches: it warns about each
        __slots__ = ("peer_id",)

        def __init__(self) -> None:
            self.peer_id = "12D3KooWunhookable"

    libp2p_logger = logging.getLogger("libp2p")
    saved = (libp2p_logger.propagate, libp2p_logger.level)
    try:
        with stderr_logging(0):
            quiet_libp2p(0)
            SwarmConn(Unhookable(), None)  # type: ignore[arg-type]
            logging.getLogger("autotls.test").warning("ours still shows")
        quiet = capsys.readouterr().err
        assert "Failed to set optional conveniences" not in quiet, quiet
        assert "Could not attach on_close hook" not in quiet
        assert "autotls: WARNING: ours still shows" in quiet
        with stderr_logging(1):
            quiet_libp2p(1)
            SwarmConn(Unhookable(), None)  # type: ignore[arg-type]
        verbose = capsys.readouterr().err
        assert "WARNING root: Failed to set optional conveniences on muxed_conn" in verbose
    finally:
        libp2p_logger.propagate, _ = saved
        libp2p_logger.setLevel(saved[1])


def test_database_passwords_never_reach_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://autotls:hunter2-secret@127.0.0.1:9/autotls"
    quiet = run_cli(capsys, "status", "--db", url)
    assert_one_line_error(quiet, cli.EXIT_DATABASE, "database postgresql://autotls:***@")
    # --verbose (before or after the command) adds the traceback, still without the password
    for argv in (["--verbose", "status", "--db", url], ["status", "-v", "--db", url]):
        loud = run_cli(capsys, *argv)
        assert loud.code == cli.EXIT_DATABASE
        assert "Traceback" in loud.err and len(loud.err.splitlines()) > 1
        assert loud.error_line.startswith("autotls: error: database postgresql://autotls:***@")
        assert "hunter2-secret" not in loud.out + loud.err


def test_secrets_are_scrubbed_from_error_lines() -> None:
    args = cli.build_parser().parse_args(
        ["run", "--eab-kid", "k", "--eab-hmac-key", "c2VjcmV0LWhtYWM", "--forge-auth", "tok-123"]
    )
    secrets = secret_values(args)
    assert scrub("key c2VjcmV0LWhtYWM and tok-123", secrets) == "key *** and ***"


# -- databases made with the engine ------------------------------------------------------------


@dataclass
class Populated:
    db: Path
    failed: int  # Failed: the CA refused the account (permanent)
    installed: int
    waiting: int  # BrokerNotified, waiting for the TXT record to show
    corrupt: int  # its data column is not JSON
    peers: dict[int, str]


@pytest.fixture
async def populated(engine: Engine, tmp_path: Path) -> Populated:
    failed = await engine.order()
    engine.ca.fail("register_account", acme_problem("unauthorized", "account is deactivated", 403))
    await engine.drive_to(failed.id, State.FAILED)
    installed = await engine.order()
    await engine.drive_to(installed.id, State.INSTALLED)
    engine.dns.lag = 10_000
    waiting = await engine.order()

    async def is_waiting() -> bool:
        snap = await engine.store.get_order(waiting.id)
        return snap.state == State.BROKER_NOTIFIED.value and "waiting_for" in snap.data

    await engine.drive(until=is_waiting)
    corrupt = await engine.order()
    db = tmp_path / "engine.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE orders SET data = '{not json' WHERE id = ?", (corrupt.id,))
    peers = {o.id: o.peer_id for o in (failed, installed, waiting, corrupt)}
    return Populated(db, failed.id, installed.id, waiting.id, corrupt.id, peers)


async def test_status_json_shows_every_order(
    populated: Populated, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await arun_cli(capsys, "status", "--json", "--db", populated.db)
    assert result.code == 0, result.err
    rows = {row["id"]: row for row in json.loads(result.out)}
    assert set(rows) == {
        populated.failed,
        populated.installed,
        populated.waiting,
        populated.corrupt,
    }
    stable = {
        "id", "peer_id", "state", "not_after", "next_run_at", "attempts",
        "last_error_class", "last_error_message",
    }  # fmt: skip
    for row in rows.values():
        assert stable <= set(row)
        assert row["peer_id"] == populated.peers[row["id"]]

    failed = rows[populated.failed]
    assert failed["state"] == "Failed" and failed["last_error_class"] == "permanent"
    assert failed["operator_action"] == (
        f"fix the cause, then `autotls retry --order {populated.failed}`"
    )
    assert "deactivated" in failed["last_error_message"]

    installed = rows[populated.installed]
    assert installed["state"] == "Installed" and installed["attempts"] == 0
    assert installed["not_after"] is not None and installed["serial"]
    assert installed["next_run_at"] < installed["not_after"]  # renewal comes before expiry

    waiting = rows[populated.waiting]
    assert waiting["state"] == "BrokerNotified" and waiting["waiting_for"]
    assert waiting["not_after"] is None

    corrupt = rows[populated.corrupt]
    assert corrupt["state"] == "New" and corrupt["corrupt"] is True
    assert (
        corrupt["last_error_class"] == "corrupt" and "data column" in corrupt["last_error_message"]
    )


async def test_status_table(populated: Populated, capsys: pytest.CaptureFixture[str]) -> None:
    result = await arun_cli(capsys, "status", "--db", populated.db)
    assert result.code == 0, result.err
    header, *lines = result.out.strip().splitlines()
    assert header.split()[:3] == ["ID", "PEER", "STATE"]
    by_id = {int(line.split()[0]): line for line in lines}
    assert (
        "Failed" in by_id[populated.failed]
        and "permanent: account is deactivated" in (by_id[populated.failed])
    )
    assert "Installed" in by_id[populated.installed]
    assert "waiting for" in by_id[populated.waiting]
    assert "corrupt" in by_id[populated.corrupt]
    assert "PRIVATE KEY" not in result.out


async def test_status_never_creates_or_upgrades_a_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.db"
    assert_one_line_error(await arun_cli(capsys, "status", "--db", missing), 3, "no database at")
    assert not missing.exists()

    old = tmp_path / "old.db"
    await asyncio.to_thread(schema.upgrade, parse_database_url(str(old)), "0001")
    outdated = await arun_cli(capsys, "status", "--db", old)
    assert_one_line_error(outdated, 3, "0001", "autotls db upgrade")
    assert await asyncio.to_thread(schema.current_revision, parse_database_url(str(old))) == "0001"

    current = await arun_cli(capsys, "db", "current", "--db", old)
    assert current.code == 0 and "current:  0001" in current.out
    assert f"head:     {schema.head_revision()}" in current.out
    assert "upgrade needed" in current.out
    upgraded = await arun_cli(capsys, "db", "upgrade", "--db", old)
    assert upgraded.code == 0 and f"upgraded from 0001 to {schema.head_revision()}" in upgraded.out
    again = await arun_cli(capsys, "db", "upgrade", "--db", old)
    assert again.code == 0 and "already at" in again.out
    assert (await arun_cli(capsys, "db", "current", "--db", old)).out.endswith("up to date\n")
    ok = await arun_cli(capsys, "status", "--json", "--db", old)
    assert ok.code == 0 and json.loads(ok.out) == []

    with sqlite3.connect(old) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    assert_one_line_error(await arun_cli(capsys, "status", "--db", old), 3, "newer autotls")
    assert_one_line_error(await arun_cli(capsys, "db", "upgrade", "--db", old), 3, "9999_future")

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    assert_one_line_error(await arun_cli(capsys, "status", "--db", garbage), 3, "unusable")


async def test_db_upgrade_creates_a_private_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "data" / "autotls.db"
    result = await arun_cli(capsys, "db", "upgrade", "--data-dir", tmp_path / "data")
    assert result.code == 0, result.err
    assert f"upgraded from (empty) to {schema.head_revision()}" in result.out
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


async def test_diagram_of_the_machine_and_of_one_order(
    populated: Populated, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    machine = await arun_cli(capsys, "diagram")  # no database needed
    assert machine.code == 0 and machine.out.startswith("stateDiagram-v2")
    assert "Installed --> RenewDue" in machine.out

    path = await arun_cli(capsys, "diagram", "--order", populated.installed, "--db", populated.db)
    assert path.code == 0, path.err
    peer = populated.peers[populated.installed]
    assert f"title: order {populated.installed} · {peer} · Installed" in path.out
    assert "New --> Registered: account_ready #1" in path.out
    assert "class Installed current" in path.out

    corrupt = await arun_cli(capsys, "diagram", "--order", populated.corrupt, "--db", populated.db)
    assert corrupt.code == 0 and "New (corrupt)" in corrupt.out

    unknown = await arun_cli(capsys, "diagram", "--order", 999, "--db", populated.db)
    assert_one_line_error(unknown, 2, "no order with id 999")

    target = tmp_path / "out" / "order.mmd"
    written = await arun_cli(
        capsys, "diagram", "--order", populated.failed, "--db", populated.db, "--output", target
    )
    assert written.code == 0 and written.out == ""
    assert "Failed" in target.read_text()


async def test_svg_diagrams_need_graphviz(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if not graphviz_available():
        component_missing("graphviz (the dot command)")
    svg = await arun_cli(capsys, "diagram", "--format", "svg")
    assert svg.code == 0 and "<svg" in svg.out
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    missing = await arun_cli(capsys, "diagram", "--format", "svg")
    assert_one_line_error(missing, 2, "Graphviz", "--format mermaid")


async def test_renew_force(
    populated: Populated, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    # two active orders (plus a corrupt one): the command will not guess
    ambiguous = await arun_cli(capsys, "renew", "--force", "--db", populated.db)
    assert_one_line_error(ambiguous, 2, "active orders", "--order")
    without_force = await arun_cli(
        capsys, "renew", "--order", populated.installed, "--db", populated.db
    )
    assert_one_line_error(without_force, 2, "--force")
    not_installed = await arun_cli(
        capsys, "renew", "--force", "--order", populated.waiting, "--db", populated.db
    )
    assert_one_line_error(not_installed, 1, "BrokerNotified", "Installed")

    done = await arun_cli(
        capsys, "renew", "--force", "--order", populated.installed, "--db", populated.db
    )
    assert done.code == 0, done.err
    assert f"order {populated.installed}: Installed -> RenewDue" in done.out
    snap = await engine.store.get_order(populated.installed)
    assert snap.state == State.RENEW_DUE.value
    last = (await engine.store.journal(populated.installed))[-1]
    assert last.trigger == "force_renewal" and (last.worker or "").startswith("cli:")
    assert last.detail["reason"] == "forced"


async def test_renew_defaults_to_the_only_active_order(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    done = await arun_cli(capsys, "renew", "--force", "--db", tmp_path / "engine.db")
    assert done.code == 0, done.err
    assert (await engine.store.get_order(order.id)).state == State.RENEW_DUE.value


async def test_retry_a_failed_order(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "engine.db"
    failed = await engine.order()
    engine.ca.fail("register_account", acme_problem("unauthorized", "account is deactivated", 403))
    await engine.drive_to(failed.id, State.FAILED)
    installed = await engine.order()
    await engine.drive_to(installed.id, State.INSTALLED)

    busy = await arun_cli(capsys, "retry", "--order", installed.id, "--db", db)
    assert_one_line_error(busy, 1, "Installed", "Failed")
    unknown = await arun_cli(capsys, "retry", "--order", 4242, "--db", db)
    assert_one_line_error(unknown, 2, "no order with id 4242")

    done = await arun_cli(capsys, "retry", "--order", failed.id, "--db", db)
    assert done.code == 0, done.err
    assert done.out.startswith(
        f"order {failed.id}: Failed -> New; starts the order over (the account is kept); "
        "a running `autotls run` takes it up at once"
    ), done.out
    snap = await engine.store.get_order(failed.id)
    assert snap.state == State.NEW.value and snap.last_error_class is None
    last = (await engine.store.journal(failed.id))[-1]
    assert last.trigger == "retry" and (last.worker or "").startswith("cli:")
    # and the engine takes it from there
    await engine.drive_to(failed.id, State.INSTALLED)


async def test_status_names_the_fix_a_configuration_wait_needs_and_retry_installs(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "engine.db"
    order = await engine.order()
    await engine.drive_to(order.id, State.FINALIZED)
    engine.installer.fail(
        MisconfiguredError("the chain does not build to a trusted root; give --trust-roots FILE")
    )
    worker = engine.worker()
    await worker.run_once()  # the chain is stored
    await worker.run_once()  # and waits for the fix
    snap = await engine.store.get_order(order.id)
    assert (snap.state, snap.last_error_class) == (State.FINALIZED.value, "configuration")

    as_json = await arun_cli(capsys, "status", "--json", "--db", db)
    (row,) = json.loads(as_json.out)
    assert row["operator_action"].startswith("needs an operator fix (--trust-roots): ")
    assert f"`autotls retry --order {order.id}`" in row["operator_action"]
    table_out = (await arun_cli(capsys, "status", "--db", db)).out
    assert "needs an operator fix (--trust-roots); configuration:" in table_out

    retried = await arun_cli(capsys, "retry", "--order", order.id, "--db", db)
    assert retried.code == 0, retried.err
    assert retried.out.startswith(
        f"order {order.id}: Finalized -> Finalized; installs the certificate the CA already "
        "issued (no new order); a running `autotls run` takes it up at once"
    ), retried.out
    await engine.drive_to(order.id, State.INSTALLED)
    assert engine.ca.count("new_order") == 1
    (row,) = json.loads((await arun_cli(capsys, "status", "--json", "--db", db)).out)
    assert row["operator_action"] is None


async def test_account_show_never_prints_the_key(
    populated: Populated, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    accounts = await engine.store.accounts()
    assert accounts
    human = await arun_cli(capsys, "account", "show", "--db", populated.db)
    as_json = await arun_cli(capsys, "account", "show", "--json", "--db", populated.db)
    assert human.code == 0 and as_json.code == 0
    records = json.loads(as_json.out)
    assert [r["id"] for r in records] == [a.id for a in accounts]
    for record, account in zip(records, accounts, strict=True):
        thumbprint = jwk_thumbprint(load_account_key(account.key_pem))
        assert record["thumbprint"] == thumbprint and thumbprint in human.out
        assert record["directory_url"] == account.directory_url
        assert record["account_url"] == account.url and record["status"] == account.status
        assert record["key_type"] == "ECDSA secp256r1"
        key_body = account.key_pem.decode().splitlines()[1]
        assert key_body not in human.out + as_json.out
    assert "PRIVATE KEY" not in human.out + as_json.out + human.err + as_json.err


async def test_account_show_with_an_unreadable_key(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    with sqlite3.connect(tmp_path / "engine.db") as conn:
        conn.execute("UPDATE accounts SET key_pem = 'garbage'")
    result = await arun_cli(capsys, "account", "show", "--json", "--db", tmp_path / "engine.db")
    assert result.code == 0, result.err
    (record,) = json.loads(result.out)
    assert record["key_type"].startswith("unreadable") and record["thumbprint"] is None


async def test_revoke_needs_a_certificate(
    populated: Populated, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await arun_cli(capsys, "revoke", "--order", populated.waiting, "--db", populated.db)
    assert_one_line_error(result, 1, f"order {populated.waiting} has no certificate")
    missing_bundle = await arun_cli(
        capsys, "revoke", "--order", populated.installed, "--db", populated.db,
        "--ca-bundle", "/nonexistent/ca.pem",
    )  # fmt: skip
    assert_one_line_error(missing_bundle, 2, "--ca-bundle")


async def test_operator_commands_do_not_create_databases(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "none.db"
    for argv in (
        ["renew", "--force"],
        ["retry", "--order", "1"],
        ["revoke"],
        ["account", "show"],
        ["diagram", "--order", "1"],
        ["db", "current"],
    ):
        result = await arun_cli(capsys, *argv, "--db", missing)
        assert_one_line_error(result, 3, "no database at")
    assert not missing.exists()


@pytest.mark.parametrize("once", [False, True], ids=["run", "run-once"])
async def test_a_worker_that_gives_up_on_the_database_ends_run_with_3(
    libp2p_installed: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    once: bool,
) -> None:
    """The worker ends after a bounded number of refused claims; ``run`` (waiting on it) and
    ``run --once`` (waiting for a certificate) end with it. The bound is one refusal here:
    the default eight back off for three minutes."""
    from autotls.fsm.operator import create_order
    from autotls.fsm.worker import Worker
    from autotls.persistence.store import Store
    from tests.test_worker_faults import _read_only

    monkeypatch.setitem(Worker.__init__.__kwdefaults__, "store_retries", 1)  # type: ignore[index]
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    key = PrivateKey.generate()
    save_private_key(key, data_dir / "identity.key")
    peer = key.peer_id.to_base36()
    async with await Store.open(f"sqlite:///{data_dir / 'autotls.db'}") as store:
        await create_order(store, peer, f"*.{peer}.libp2p.direct", now=datetime.now(UTC))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_ca = f"http://127.0.0.1:{sock.getsockname()[1]}/dir"  # unreachable: a warning
    argv = ["run", "--data-dir", data_dir, "--listen", "/ip4/127.0.0.1/tcp/0", "--ca", dead_ca]
    with _read_only(data_dir / "autotls.db"):
        result = await asyncio.wait_for(
            arun_cli(capsys, *argv, *(["--once"] if once else [])), 120
        )
    assert result.code == 3, result.err
    assert result.error_line.startswith(f"autotls: error: database sqlite:///{data_dir}")
    assert result.error_line.endswith(
        "is unusable: attempt to write a readonly database (1 attempts)"
    )
    assert "Traceback" not in result.err


def test_a_progress_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log records come from other threads too (aiosqlite, py-libp2p): a line written in two
    pieces (print writes the text, then the newline) can get a record in between, which
    breaks ``--log-format json``'s one object per line. Every line is one write."""
    from autotls.cli.output import err, use_json_lines

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    recorder = Recorder()
    monkeypatch.setattr("sys.stderr", recorder)
    for json_lines in (False, True):
        use_json_lines(json_lines)
        try:
            err("stopping", order_id=3)
        finally:
            use_json_lines(False)
    assert len(recorder.writes) == 2
    for written in recorder.writes:
        assert written.endswith("\n") and written.count("\n") == 1
    assert json.loads(recorder.writes[1])["message"] == "stopping"
