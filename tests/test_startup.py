"""What each command loads: the quick commands import only what they use (issue 11 §1).

Each command runs in a fresh interpreter that reports the modules it ended up with
(``sys.modules``), so the checks are about imports, never about time (bench/cli.py prints
the times). ``--help`` loads neither SQLAlchemy nor cryptography; ``status``, ``diagram``,
``db current`` and ``account show`` load neither Alembic nor the network stack; an outdated
schema is still upgraded, by Alembic, where it was before. ``run --once`` as a process loads
Alembic only to create a new database, and neither the broker's server side nor the
recorder; its garbage collector is off while it starts, back on (start-up frozen) once the
node is up, and left alone in process. Also: the lazy public names of ``autotls``,
``autotls.acme``, ``autotls.peeridauth`` and ``autotls.recording`` (PEP 562) resolve to the
same objects as before.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import gc
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autotls.cli import dispatch
from autotls.cli.options import parse_arguments
from autotls.fsm.machine import State
from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleStack
from autotls.persistence import schema
from autotls.persistence.urls import parse_database_url
from tests.fixtures.engine import Engine

ROOT = Path(__file__).resolve().parent.parent

# Runs the command line as the console script does and prints what it loaded.
_PROBE = """
import contextlib, io, json, sys
from autotls.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "out": out.getvalue(), "modules": sorted(sys.modules)}))
"""

# prometheus_client too: only `run --metrics-listen` and embedders of autotls.metrics load it.
NETWORK_AND_MIGRATIONS = {"alembic", "aiohttp", "trio", "libp2p", "prometheus_client"}
HELP_FORBIDDEN = NETWORK_AND_MIGRATIONS | {"sqlalchemy", "cryptography"}


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOTLS_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    return env


def python(
    tmp_path: Path, *argv: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` in a new process, in the repository, with no AUTOTLS_* variable."""
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=ROOT,
        env={**_environment(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def probe(tmp_path: Path, *argv: object) -> tuple[int, str, set[str]]:
    """(exit code, stdout, modules loaded: dotted names and their top-level packages) of
    ``autotls ARGV`` in a new process."""
    result = python(tmp_path, "-c", _PROBE, *argv)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    modules = set(report["modules"])
    return report["code"], report["out"], modules | {name.split(".")[0] for name in modules}


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["status", "--help"], ["status", "--jsn"], ["run", "--help"]],
)
def test_help_and_usage_errors_load_no_database_or_crypto_library(
    tmp_path: Path, argv: list[str]
) -> None:
    code, out, loaded = probe(tmp_path, *argv)
    assert code == (2 if "--jsn" in argv else 0)
    assert not loaded & HELP_FORBIDDEN, sorted(loaded & HELP_FORBIDDEN)
    if argv == ["--help"]:
        assert "Exit codes" in out


@pytest.fixture
async def installed_db(engine: Engine) -> Path:
    """A database at the head revision holding an account and an Installed order."""
    order = await engine.order()
    await engine.drive_to(order.id, State.INSTALLED)
    database = engine.store.url.database
    assert database is not None
    return Path(database)


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["diagram"],
        ["diagram", "--order", "1"],
        ["db", "current"],
        ["account", "show"],
        ["account", "show", "--json"],
    ],
)
async def test_quick_commands_load_neither_alembic_nor_the_network_stack(
    installed_db: Path, tmp_path: Path, argv: list[str]
) -> None:
    code, out, loaded = await asyncio.to_thread(probe, tmp_path, *argv, "--db", installed_db)
    assert code == 0
    assert not loaded & NETWORK_AND_MIGRATIONS, sorted(loaded & NETWORK_AND_MIGRATIONS)
    # a SQLite database needs no PostgreSQL dialect (models.with_postgresql_options), and the
    # store speaks Core: no ORM, no async engine
    assert not loaded & {
        "sqlalchemy.dialects.postgresql",
        "sqlalchemy.orm",
        "sqlalchemy.ext.asyncio",
    }, sorted(loaded)
    if argv[0] == "status":
        assert "Installed" in out
    if argv[0] == "account":
        assert "ECDSA" in out or "RSA" in out or "Ed25519" in out
    if argv[0] == "db":
        assert "up to date" in out


async def test_the_console_script_prints_everything_and_keeps_exit_codes(
    installed_db: Path, tmp_path: Path
) -> None:
    """As the process's entry point, main() leaves the exit's final collection out for the
    quick commands (dispatch._execute): what they print and their exit codes stay whole."""
    listed = await asyncio.to_thread(
        python, tmp_path, "-m", "autotls", "status", "--json", "--db", installed_db
    )
    assert listed.returncode == 0, listed.stderr
    assert [row["state"] for row in json.loads(listed.stdout)] == ["Installed"]
    missing = await asyncio.to_thread(
        python, tmp_path, "-m", "autotls", "status", "--db", tmp_path / "missing.db"
    )
    assert missing.returncode == 3 and missing.stdout == ""
    assert missing.stderr.startswith("autotls: error: no database at")
    assert len(missing.stderr.splitlines()) == 1


def test_an_outdated_schema_is_still_upgraded_with_alembic(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    url = parse_database_url(str(old))
    schema.upgrade(url, "0001")

    # A read-only command refuses it (as before) and needed Alembic to say why.
    code, _, loaded = probe(tmp_path, "status", "--db", old)
    assert code == 3 and "alembic" in loaded
    assert schema.current_revision(url) == "0001"

    code, out, loaded = probe(tmp_path, "db", "upgrade", "--db", old)
    assert code == 0 and "alembic" in loaded
    assert f"upgraded from 0001 to {schema.HEAD_REVISION}" in out
    assert schema.current_revision(url) == schema.head_revision()

    # Now current: the next command reads the revision with a plain query.
    code, _, loaded = probe(tmp_path, "status", "--db", old)
    assert code == 0 and "alembic" not in loaded


def test_a_new_database_is_created_at_head_without_alembic(tmp_path: Path) -> None:
    fresh = tmp_path / "data" / "autotls.db"
    code, out, loaded = probe(tmp_path, "db", "upgrade", "--data-dir", fresh.parent)
    assert code == 0 and "alembic" not in loaded
    assert f"upgraded from (empty) to {schema.HEAD_REVISION}" in out
    assert schema.current_revision(parse_database_url(str(fresh))) == schema.head_revision()


# -- run as a process ---------------------------------------------------------------------------

# The console script's way (main() reads sys.argv and the process ends when it returns); at
# exit, after autotls's own atexit handlers, what was loaded and the collector's state.
_RUN_PROBE = """
import atexit, gc, json, os, sys
from autotls.cli import main

def report():
    with open(os.environ["PROBE_REPORT"], "w") as out:
        json.dump({"modules": sorted(sys.modules), "collecting": gc.isenabled(),
                   "frozen": gc.get_freeze_count()}, out)

atexit.register(report)
sys.exit(main())
"""


async def test_run_once_loads_alembic_neither_to_create_nor_to_reuse_the_database(
    libp2p_installed: None, pebble: PebbleStack, pebble_broker: LocalBroker, tmp_path: Path
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_text("".join(pebble.issuer_roots_pem()))
    host, port = pebble.dns_address

    def run_once(key: Path) -> tuple[str, dict[str, Any]]:
        report = tmp_path / f"{key.stem}.json"
        result = python(
            tmp_path, "-c", _RUN_PROBE,
            "run", "--once", "--data-dir", tmp_path / "node", "--key", key,
            "--ca", pebble.directory_url, "--ca-bundle", pebble.ca_file, "--trust-roots", roots,
            "--broker", pebble_broker.url, "--dns-server", f"{host}:{port}",
            "--allow-private-addresses",
            "--listen", "/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws",
            env={"PROBE_REPORT": str(report)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout, json.loads(report.read_text())

    out, created = await asyncio.to_thread(run_once, tmp_path / "first.key")
    assert "certificate loaded: " in out
    # a new database is created at the head from the tables (schema._create_at_head)
    assert "alembic" not in created["modules"]
    # the collector is back on, and what was alive at the end is frozen out of the exit's
    # collections (dispatch._execute)
    assert created["collecting"] and created["frozen"] > 0

    out, current = await asyncio.to_thread(run_once, tmp_path / "second.key")
    assert "certificate loaded: " in out
    loaded = set(current["modules"])
    assert "libp2p" in loaded and "autotls.service" in loaded
    assert not {"alembic", "autotls.peeridauth.server", "autotls.recording.recorder"} & loaded


def test_run_settles_the_collector_once_started_only_as_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the process (dispatch._execute with process_ends): no collection while starting,
    start-up frozen and the collector back on once the node is up (run.py calls
    args.on_started), all frozen at the end. In process: the collector is left alone."""
    seen: list[tuple[str, bool, int]] = []

    async def run(args: argparse.Namespace, stop: dispatch.Stop) -> int:
        seen.append(("starting", gc.isenabled(), gc.get_freeze_count()))
        args.on_started()
        seen.append(("started", gc.isenabled(), gc.get_freeze_count()))
        return 0

    monkeypatch.setattr(dispatch, "commands", lambda: {"run": run})
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert dispatch._execute(parse_arguments(["run", "--once"]), process_ends=False) == 0
    assert seen == [("starting", True, 0), ("started", True, 0)]
    assert gc.isenabled() and gc.get_freeze_count() == 0

    seen.clear()
    try:
        assert dispatch._execute(parse_arguments(["run", "--once"]), process_ends=True) == 0
        (_, on_while_starting, _), (_, on_once_started, frozen_once_started) = seen
        assert not on_while_starting and on_once_started and frozen_once_started > 0
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this process goes on: back to how it was
        gc.enable()


# -- lazy public names -----------------------------------------------------------------------


def test_importing_autotls_loads_nothing_heavy(tmp_path: Path) -> None:
    program = "import json, sys, autotls; print(json.dumps(sorted(sys.modules)))"
    result = python(tmp_path, "-c", program)
    assert result.returncode == 0, result.stderr
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert not loaded & HELP_FORBIDDEN, sorted(loaded & HELP_FORBIDDEN)


def _type_checking_imports(module_name: str) -> dict[str, str]:
    """name -> module of every ``from M import name`` under ``if TYPE_CHECKING:``."""
    module = importlib.import_module(module_name)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module is not None
                found.update({alias.name: stmt.module for alias in stmt.names})
    return found


@pytest.mark.parametrize(
    "package", ["autotls", "autotls.acme", "autotls.peeridauth", "autotls.recording"]
)
def test_lazy_public_names_are_declared_once_and_resolve(package: str) -> None:
    module = importlib.import_module(package)
    exports: dict[str, str] = module._EXPORTS
    # what mypy sees (the TYPE_CHECKING imports), what runs (_EXPORTS) and __all__ agree
    assert _type_checking_imports(package) == exports
    assert set(module.__all__) == set(exports)
    for name, where in exports.items():
        assert getattr(module, name) is getattr(importlib.import_module(where), name)
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name


def test_the_public_imports_still_work() -> None:
    from autotls import AutoTLS, IssuanceFailed, PrivateKey
    from autotls.acme import REVOCATION_REASONS, AcmeClient, load_account_key
    from autotls.acme.client import AcmeClient as DefinedAcmeClient
    from autotls.service import AutoTLS as DefinedAutoTLS

    assert AutoTLS is DefinedAutoTLS and AcmeClient is DefinedAcmeClient
    assert issubclass(IssuanceFailed, Exception) and callable(load_account_key)
    assert PrivateKey.generate().peer_id is not None
    assert REVOCATION_REASONS["keyCompromise"] == 1
