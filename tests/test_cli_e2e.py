"""The ``autotls`` command line end to end: real processes (``python -m autotls``) against the
local stack (Pebble + challtestsrv + the local broker, which dials the node back over real
libp2p), then the operator commands against the database those runs leave behind.

* ``run --once``: a permanent failure (the CA wants External Account Binding) exits 1; after
  ``retry`` and with the EAB key from the environment the same order is issued and exits 0;
  ``renew --force`` + ``run --once`` renews it; ``revoke`` revokes it at Pebble.
* SIGINT and SIGTERM stop a running node cleanly (130 and 0) and the next start resumes the
  same order: no second ACME order is placed; SIGTERM is serviced while the node is still
  starting, too.
* ``demo --json`` prints one JSON object with ``tls_verified: true``.
* Issue 8: ``run --once`` always ends -- 75 at ``--deadline`` when the broker cannot dial the
  node (and the next run resumes the order), 0 for a second process of the same identity
  once the first installed, one line and no order for a ``--ca`` that is not ACME, 3 for a
  read-only database; ``AUTOTLS_FAULTS`` kills a running node where it says; ``-vv`` (human
  and JSON) never prints a key, the EAB HMAC key or the forge token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification

from autotls.localstack.pebble import PebbleOptions, pebble_available
from autotls.localstack.stack import LocalStack
from autotls.peerid import PrivateKey, load_private_key, save_private_key
from autotls.persistence.records import OrderSnapshot
from autotls.persistence.store import Store
from tests.fixtures.components import component_missing
from tests.test_cli import arun_cli, run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]
PROCESS_DEADLINE_S = 90.0
POLL_DEADLINE_S = 30.0


@dataclass
class Finished:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOTLS_")}
    env.update(extra)
    return env


async def start_autotls(*argv: object, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autotls",
        *[str(a) for a in argv],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_environment(env),
        cwd=ROOT,
    )


async def finish(process: asyncio.subprocess.Process) -> Finished:
    try:
        out, err = await asyncio.wait_for(process.communicate(), PROCESS_DEADLINE_S)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(f"autotls did not finish in {PROCESS_DEADLINE_S}s:\n{err.decode()}")
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


async def autotls(*argv: object, env: dict[str, str]) -> Finished:
    return await finish(await start_autotls(*argv, env=env))


@pytest.fixture
def components(libp2p_installed: None) -> None:
    if not pebble_available():
        component_missing("pebble (the pebble and pebble-challtestsrv binaries)")


@pytest.fixture
async def eab_stack(components: None, tmp_path: Path) -> AsyncIterator[tuple[LocalStack, str]]:
    hmac_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    options = PebbleOptions(eab_keys={"kid-1": hmac_key})
    async with LocalStack(tmp_path / "stack", pebble_options=options) as stack:
        yield stack, hmac_key


@pytest.fixture
async def stack(components: None, tmp_path: Path) -> AsyncIterator[LocalStack]:
    async with LocalStack(tmp_path / "stack") as running:
        yield running


def write_roots(stack: LocalStack, path: Path) -> Path:
    path.write_text("".join(stack.pebble.issuer_roots_pem()))
    return path


def run_argv(stack: LocalStack, data_dir: Path, roots: Path, *extra: object) -> list[object]:
    return [
        "run",
        "--data-dir",
        data_dir,
        "--ca",
        stack.pebble.directory_url,
        "--ca-bundle",
        stack.pebble.ca_file,
        "--trust-roots",
        roots,
        "--listen",
        *LISTEN,
        *extra,
    ]


def stack_env(stack: LocalStack, broker_url: str | None = None) -> dict[str, str]:
    """Some settings come from the environment, as a service unit would give them."""
    return {
        "AUTOTLS_BROKER": broker_url or stack.broker_url,
        "AUTOTLS_DNS_SERVER": stack.dns_server,
        "AUTOTLS_ALLOW_PRIVATE_ADDRESSES": "1",
    }


async def status(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    result = await arun_cli(capsys, "status", "--json", "--data-dir", data_dir)
    assert result.code == 0, result.err
    rows: list[dict[str, object]] = json.loads(result.out)
    return rows


def verifies_for(chain_pem: bytes, roots_pem: list[str], name: str) -> bool:
    roots = [c for pem in roots_pem for c in x509.load_pem_x509_certificates(pem.encode())]
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .build_server_verifier(x509.DNSName(name))
    )
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError:
        return False
    return True


async def test_run_once_end_to_end_then_operator_commands(
    eab_stack: tuple[LocalStack, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, hmac_key = eab_stack
    data_dir = tmp_path / "node"
    roots = write_roots(stack, tmp_path / "roots.pem")
    env = stack_env(stack)
    outputs: list[str] = []

    # 1. No EAB: the CA refuses the account, permanently -> Failed, exit 1. The key is new.
    refused = await autotls(*run_argv(stack, data_dir, roots, "--once"), env=env)
    outputs.append(refused.text)
    assert refused.code == 1, refused.err
    assert "generated a new identity key" in refused.err
    error_line = refused.err.strip().splitlines()[-1]
    assert error_line.startswith("autotls: error: order 1 failed (permanent)"), error_line
    key_path = data_dir / "identity.key"
    key_bytes = key_path.read_bytes()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    label = load_private_key(key_path).peer_id.to_base36()
    (row,) = await status(data_dir, capsys)
    assert row["state"] == "Failed" and row["last_error_class"] == "permanent"

    # 2. retry, and run again with the EAB key in the environment: the same order is issued.
    retried = await arun_cli(capsys, "retry", "--order", 1, "--data-dir", data_dir)
    assert retried.code == 0, retried.err
    issued = await autotls(
        *run_argv(stack, data_dir, roots, "--once", "--eab-kid", "kid-1"),
        env={**env, "AUTOTLS_EAB_HMAC_KEY": hmac_key},
    )
    outputs.append(issued.text)
    assert issued.code == 0, issued.err
    assert key_path.read_bytes() == key_bytes  # the identity is kept, never rewritten
    assert "order 1: Finalized -> Installed (certificate_installed)" in issued.err
    assert f"certificate loaded: *.{label}.libp2p.direct" in issued.out
    forge = [line.strip() for line in issued.out.splitlines() if line.startswith("  /")]
    assert any(a.startswith(f"/dns4/127-0-0-1.{label}.libp2p.direct/tcp/") for a in forge), forge
    assert any(f"/tls/sni/127-0-0-1.{label}.libp2p.direct/ws" in a for a in forge), forge

    (row,) = await status(data_dir, capsys)
    assert row["id"] == 1 and row["state"] == "Installed" and row["peer_id"] == label
    assert row["not_after"] and row["last_error_class"] is None
    first_serial = row["serial"]
    chain = data_dir / "certs" / label / "fullchain.pem"
    assert verifies_for(
        chain.read_bytes(), stack.pebble.issuer_roots_pem(), f"127-0-0-1.{label}.libp2p.direct"
    )
    assert (data_dir / "certs" / label / "privkey.pem").stat().st_mode & 0o077 == 0

    accounts = await arun_cli(capsys, "account", "show", "--json", "--data-dir", data_dir)
    (account,) = json.loads(accounts.out)
    assert account["directory_url"] == stack.pebble.directory_url
    assert account["status"] == "valid" and account["account_url"].startswith("https://")
    outputs.append(accounts.out)

    diagram = await arun_cli(capsys, "diagram", "--order", 1, "--data-dir", data_dir)
    assert f"title: order 1 · {label} · Installed" in diagram.out
    assert "Failed --> New: retry #" in diagram.out
    assert "Finalized --> Installed: certificate_installed #" in diagram.out

    # 3. renew --force, then run --once renews it
    renew = await arun_cli(capsys, "renew", "--force", "--data-dir", data_dir)
    assert renew.code == 0, renew.err
    renewed = await autotls(*run_argv(stack, data_dir, roots, "--once"), env=env)
    outputs.append(renewed.text)
    assert renewed.code == 0, renewed.err
    assert "certificate renewed:" in renewed.out
    (row,) = await status(data_dir, capsys)
    assert row["state"] == "Installed" and row["serial"] != first_serial

    # 4. revoke at Pebble with the stored account key, which forces a renewal
    revoke = await arun_cli(
        capsys, "revoke", "--reason", "superseded", "--ca-bundle", stack.pebble.ca_file,
        "--data-dir", data_dir,
    )  # fmt: skip
    assert revoke.code == 0, revoke.err
    assert f"revoked certificate {row['serial']} of order 1" in revoke.out
    assert "Installed -> RenewDue" in revoke.out
    again = await arun_cli(
        capsys, "revoke", "--no-renew", "--ca-bundle", stack.pebble.ca_file,
        "--data-dir", data_dir,
    )  # fmt: skip
    assert again.code == 0 and "already revoked" in again.out
    (row,) = await status(data_dir, capsys)
    assert row["state"] == "RenewDue"
    # Recorded on the certificate's row (the first time, with its reason): a running node
    # stops advertising it.
    async with await Store.open(f"sqlite:///{data_dir / 'autotls.db'}", upgrade=False) as store:
        revoked = [
            (c.revoked_at is not None, c.revocation_reason) for c in await store.certificates()
        ]
    assert revoked == [(False, None), (True, "superseded")]

    everything = "".join(outputs) + revoke.out + again.out
    assert "PRIVATE KEY" not in everything
    assert hmac_key not in everything


def _dead_broker_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


async def poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Until ``check`` holds, with a deadline (the process runs on its own clock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_DEADLINE_S
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def read_order(db: Path) -> OrderSnapshot | None:
    if not await asyncio.to_thread(db.exists):
        return None
    try:
        async with await Store.open(f"sqlite:///{db}", upgrade=False) as store:
            rows = await store.list_orders()
    except Exception:  # the schema is being created by the process under test
        return None
    snaps = [r for r in rows if isinstance(r, OrderSnapshot)]
    return snaps[0] if snaps else None


async def test_signals_stop_cleanly_and_a_restart_resumes_the_order(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "node"
    db = data_dir / "autotls.db"
    roots = write_roots(stack, tmp_path / "roots.pem")
    # The broker is down: its health check fails before any ACME order is placed, and the
    # order waits in Registered.
    down = stack_env(stack, broker_url=_dead_broker_url())
    attempts_seen = 0

    async def broker_attempted() -> bool:
        snap = await read_order(db)
        return (
            snap is not None
            and snap.state == "Registered"
            and snap.attempts > attempts_seen
            and snap.last_error_class == "transient"
        )

    for signum, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):
        process = await start_autotls(*run_argv(stack, data_dir, roots), env=down)
        await poll(broker_attempted, "a failed broker health check in Registered")
        process.send_signal(signum)
        stopped = await finish(process)
        assert stopped.code == expected, stopped.err
        assert f"stopped on {signum.name}" in stopped.err
        snap = await read_order(db)
        assert snap is not None and snap.id == 1 and snap.state == "Registered"
        assert not snap.data.get("order_url")  # no order while the broker is down
        assert snap.lease_owner is None  # the worker let go of it
        attempts_seen = snap.attempts

    resumed = await autotls(*run_argv(stack, data_dir, roots, "--once"), env=stack_env(stack))
    assert resumed.code == 0, resumed.err
    rows = await status(data_dir, capsys)
    assert [(r["id"], r["state"]) for r in rows] == [(1, "Installed")]
    async with await Store.open(f"sqlite:///{db}", upgrade=False) as store:
        triggers = [entry.trigger for entry in await store.journal(1)]
    assert triggers.count("create") == 1
    assert triggers.count("order_placed") == 1  # resumed: no second ACME order
    assert triggers[-1] == "certificate_installed"


async def test_demo_json(
    components: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    demo = await autotls("demo", "--json", "--workdir", workdir, env={})
    assert demo.code == 0, demo.err
    lines = demo.out.strip().splitlines()
    assert len(lines) == 1, demo.out  # exactly one JSON object on stdout
    result = json.loads(lines[0])
    assert {
        "peer_id", "label", "domain", "state", "cert_path", "not_after", "addresses",
        "acme_requests", "elapsed_s", "tls_verified",
    } <= set(result)  # fmt: skip
    assert result["state"] == "Installed" and result["tls_verified"] is True
    assert result["domain"] == f"*.{result['label']}.libp2p.direct"
    assert await asyncio.to_thread(Path(result["cert_path"]).is_file)
    assert any(f"{result['label']}.libp2p.direct" in a for a in result["addresses"])
    assert "New -> Registered" in demo.err  # progress goes to stderr
    assert "PRIVATE KEY" not in demo.out + demo.err

    # the commands work against the database the demo leaves
    (row,) = await status(workdir, capsys)
    assert row["state"] == "Installed" and row["peer_id"] == result["label"]


def test_demo_that_misses_its_deadline_exits_1(
    components: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "demo", "--timeout", "0.01", "--workdir", tmp_path / "demo")
    assert result.code == 1, result.err
    assert "tls_verified: false" in result.out and "state:" in result.out
    assert result.error_line.startswith("autotls: error: demo failed: not installed after")


# -- issue 8: bad local input, --once always ends, a second process never misleads ----------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there once the socket is closed


async def journal_triggers(database: str, order_id: int = 1) -> list[str]:
    async with await Store.open(database, upgrade=False) as store:
        return [entry.trigger for entry in await store.journal(order_id)]


class Streaming:
    """A running ``autotls`` whose stderr is read as it comes, so a test can wait for a line
    (the process runs on its own clock) before it acts."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._grew = asyncio.Event()
        assert process.stderr is not None
        self._reader = asyncio.ensure_future(self._read(process.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace"))
            self._grew.set()
        self._grew.set()

    async def line(self, fragment: str) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROCESS_DEADLINE_S
        while True:
            for text in self.lines:
                if fragment in text:
                    return text
            if self._reader.done():
                pytest.fail(f"autotls ended without {fragment!r}:\n{''.join(self.lines)}")
            self._grew.clear()
            try:
                await asyncio.wait_for(self._grew.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                self.process.kill()
                pytest.fail(f"no {fragment!r} from autotls:\n{''.join(self.lines)}")

    async def finish(self) -> Finished:
        assert self.process.stdout is not None
        try:
            out = await asyncio.wait_for(self.process.stdout.read(), PROCESS_DEADLINE_S)
            await asyncio.wait_for(self._reader, PROCESS_DEADLINE_S)
            await asyncio.wait_for(self.process.wait(), PROCESS_DEADLINE_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            pytest.fail(f"autotls did not finish:\n{''.join(self.lines)}")
        assert self.process.returncode is not None
        return Finished(self.process.returncode, out.decode(), "".join(self.lines))


async def test_once_ends_with_75_at_the_deadline_and_the_next_run_resumes(
    stack: LocalStack, tmp_path: Path
) -> None:
    data_dir = tmp_path / "node"
    database = f"sqlite:///{data_dir / 'autotls.db'}"
    roots = write_roots(stack, tmp_path / "roots.pem")
    # The broker can never dial the node back at the address it is told: the order waits in
    # Challenged, its next attempt soon after the deadline.
    unreachable = f"/ip4/127.0.0.1/tcp/{_closed_port()}"
    gave_up = await autotls(
        *run_argv(stack, data_dir, roots, "--once", "--deadline", "8s", "--announce", unreachable),
        env={**stack_env(stack), "AUTOTLS_LOG_FORMAT": "json"},
    )
    assert gave_up.code == 75, gave_up.err
    records = [json.loads(line) for line in gave_up.err.strip().splitlines()]  # JSON, each one
    last = records[-1]
    assert last["level"] == "error" and last["exit_code"] == 75
    assert last["message"].startswith("order 1 is Challenged; its next attempt at ")
    assert "broker could not dial the node back" in last["message"]
    assert last["message"].endswith("; the order is kept; the next run resumes it")
    label = load_private_key(data_dir / "identity.key").peer_id.to_base36()
    placed = [r for r in records if r.get("trigger") == "order_placed"]
    assert placed and placed[0]["order_id"] == 1 and placed[0]["peer"] == label
    assert placed[0]["state"] == "Challenged"
    assert any(
        r.get("error_class") == "transient" and r.get("state") == "Challenged" for r in records
    )

    resumed = await autotls(*run_argv(stack, data_dir, roots, "--once"), env=stack_env(stack))
    assert resumed.code == 0, resumed.err
    triggers = await journal_triggers(database)
    assert triggers.count("order_placed") == 1  # resumed, never ordered again
    assert triggers[-1] == "certificate_installed"


async def test_a_second_process_for_one_identity_ends_once_the_first_installed(
    stack: LocalStack, tmp_path: Path
) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    save_private_key(PrivateKey.generate(), data_dir / "identity.key")
    roots = write_roots(stack, tmp_path / "roots.pem")
    # No poll for an hour: the process without the lease can only learn of the certificate
    # from the store's change feed.
    argv = run_argv(stack, data_dir, roots, "--once", "--store-poll", "1h")
    first, second = await asyncio.gather(
        start_autotls(*argv, env=stack_env(stack)), start_autotls(*argv, env=stack_env(stack))
    )
    results = await asyncio.gather(finish(first), finish(second))
    for result in results:
        assert result.code == 0, result.err
        assert "certificate loaded:" in result.out
    installers = [r for r in results if "Finalized -> Installed (certificate_installed)" in r.err]
    assert len(installers) == 1, [r.err for r in results]
    async with await Store.open(f"sqlite:///{data_dir / 'autotls.db'}", upgrade=False) as store:
        assert len(await store.certificates()) == 1
        assert [o.id for o in await store.list_orders()] == [1]
        triggers = [entry.trigger for entry in await store.journal(1)]
    assert triggers.count("order_placed") == 1 and triggers.count("certificate_installed") == 1


async def test_once_against_a_ca_that_is_not_acme_is_one_line_before_any_order(
    components: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiohttp import web

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Welcome to nginx!</body></html>",
                            content_type="text/html")  # fmt: skip

    app = web.Application()
    app.router.add_get("/dir", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        data_dir = tmp_path / "node"
        result = await autotls("run", "--once", "--data-dir", data_dir, "--listen", *LISTEN,
                               "--ca", f"http://127.0.0.1:{port}/dir", env={})  # fmt: skip
    finally:
        await runner.cleanup()
    assert result.code == 2, result.err
    errors = [line for line in result.err.splitlines() if line.startswith("autotls: error:")]
    assert errors == [result.err.strip().splitlines()[-1]]
    assert errors[0].startswith(
        f"autotls: error: http://127.0.0.1:{port}/dir is not an ACME directory: "
    )
    assert "Traceback" not in result.err
    assert await status(data_dir, capsys) == []  # no order was touched


async def test_once_on_a_read_only_database_exits_3_in_one_line(
    components: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_worker_faults import _read_only

    data_dir = tmp_path / "node"
    made = await arun_cli(capsys, "db", "upgrade", "--data-dir", data_dir)
    assert made.code == 0, made.err
    dead_ca = f"http://127.0.0.1:{_closed_port()}/dir"
    with _read_only(data_dir / "autotls.db"):
        result = await autotls(
            "run", "--once", "--data-dir", data_dir, "--listen", *LISTEN, "--ca", dead_ca, env={}
        )
    assert result.code == 3, result.err
    assert result.err.strip().splitlines()[-1] == (
        "autotls: error: database problem: attempt to write a readonly database"
    )
    assert "Traceback" not in result.err


async def test_sigterm_is_serviced_while_the_node_is_still_starting(
    components: None, tmp_path: Path
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        argv = ["run", "--data-dir", tmp_path / "node", "--listen", *LISTEN]
        silent_ca = f"http://127.0.0.1:{port}/dir"
        running = Streaming(await start_autotls(*argv, "--ca", silent_ca, env={}))
        await running.line("listening on")  # AutoTLS starts: it asks the silent CA
        running.process.send_signal(signal.SIGTERM)
        stopped = await running.finish()
    assert stopped.code == 0, stopped.err
    assert stopped.err.strip().splitlines()[-1] == "stopped on SIGTERM"
    # It did not wait for the directory check to give up first.
    assert "did not answer" not in stopped.err and "not reachable" not in stopped.err
    assert "Traceback" not in stopped.err


async def test_autotls_faults_kills_a_running_node_at_the_named_point(
    stack: LocalStack, tmp_path: Path
) -> None:
    data_dir = tmp_path / "node"
    database = f"sqlite:///{data_dir / 'autotls.db'}"
    roots = write_roots(stack, tmp_path / "roots.pem")
    argv = run_argv(stack, data_dir, roots, "--once")
    killed = await autotls(
        *argv, env={**stack_env(stack), "AUTOTLS_FAULTS": "after_effect@Validated#1:kill"}
    )
    assert killed.code == -signal.SIGKILL, killed.err
    snap = await read_order(data_dir / "autotls.db")
    assert snap is not None and snap.state == "Validated"  # finalized at the CA, not committed
    assert "DNSPropagated -> Validated" in killed.err and "-> Finalized" not in killed.err

    resumed = await autotls(*argv, env=stack_env(stack))
    assert resumed.code == 0, resumed.err
    triggers = await journal_triggers(database)
    assert triggers.count("order_placed") == 1 and triggers.count("certificate_issued") == 1
    assert triggers[-1] == "certificate_installed"

    bad = await autotls(*argv, env={**stack_env(stack), "AUTOTLS_FAULTS": "sometime@Validated"})
    assert bad.code == 2, bad.err
    assert bad.err.strip().splitlines()[-1].startswith(
        "autotls: error: AUTOTLS_FAULTS='sometime@Validated': unknown fault point 'sometime'"
    )


async def test_debug_output_never_carries_a_secret(
    eab_stack: tuple[LocalStack, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, hmac_key = eab_stack
    data_dir = tmp_path / "node"
    roots = write_roots(stack, tmp_path / "roots.pem")
    forge_token = "forge-" + secrets.token_urlsafe(24)
    env = {**stack_env(stack), "AUTOTLS_EAB_HMAC_KEY": hmac_key, "AUTOTLS_FORGE_AUTH": forge_token}
    argv = run_argv(stack, data_dir, roots, "--once", "--eab-kid", "kid-1")
    issued = await autotls("-vv", *argv, env=env)
    assert issued.code == 0, issued.err[-3000:]
    renew = await arun_cli(capsys, "renew", "--force", "--data-dir", data_dir)
    assert renew.code == 0, renew.err
    renewed = await autotls("-vv", *argv, "--log-format", "json", env=env)
    assert renewed.code == 0, renewed.err[-3000:]
    assert all(json.loads(line) for line in renewed.err.strip().splitlines())

    async with await Store.open(f"sqlite:///{data_dir / 'autotls.db'}", upgrade=False) as store:
        (account,) = await store.accounts()
        keys = [account.key_pem] + [cert.key_pem for cert in await store.certificates()]
    assert len(keys) == 3
    identity = (data_dir / "identity.key").read_bytes()
    shown = issued.out + issued.err + renewed.out + renewed.err
    # The libraries did log what holds keys (rows, statement parameters), redacted.
    assert "[redacted private key]" in issued.err and "[redacted private key]" in renewed.err
    assert "PRIVATE KEY" not in shown
    for pem in keys:
        body = [line for line in pem.decode().splitlines() if "-----" not in line]
        for line in body:
            assert line not in shown and line.replace("/", "\\/") not in shown
    for secret in (hmac_key, forge_token, base64.b64encode(identity).decode(), identity.hex()):
        assert secret not in shown
