"""Record live, replay offline (issue 12 §1-2 "done when"): real Pebble (with External Account
Binding, 20 % of nonces rejected), the local broker with its real libp2p dial-back, and a real
py-libp2p node; the embedding API records (``AutoTLS(record=DIR)``), and the command line
(``autotls run --once`` with ``AUTOTLS_RECORD``). Then Pebble, challtestsrv and the broker are
stopped, and the transcript replays identically with nothing to talk to.

And the transcripts of such a run hold none of its secret values: the account, certificate and
identity keys, every nonce, JWS signature and CSR signature that went over the wire, the EAB
HMAC key and its MAC, the PeerID-auth signatures, challenges, opaque state and bearer tokens,
the ``Forge-Authorization`` token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from autotls import AutoTLS, PrivateKey
from autotls.acme import ExternalAccountBinding
from autotls.fsm.ports import EngineSettings
from autotls.http import Exchange
from autotls.localstack.pebble import PebbleOptions, pebble_available
from autotls.localstack.stack import LocalStack
from autotls.node import Libp2pNode
from autotls.persistence.store import Store
from autotls.recording import assert_replays, read_transcript
from tests.fixtures.components import component_missing
from tests.test_engine_steps import leak_marks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("libp2p_installed")]

ROOT = Path(__file__).resolve().parent.parent
LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]
FAST = EngineSettings(
    dns_poll_interval=timedelta(milliseconds=100),
    authz_poll_interval=timedelta(milliseconds=100),
    order_poll_interval=timedelta(milliseconds=100),
)
FORGE_TOKEN = "forge-access-token-" + secrets.token_hex(16)
EAB_KID = "kid-1"


@dataclass
class LiveRun:
    stack: LocalStack
    transcripts: Path
    data_dir: Path
    identity: PrivateKey
    hmac_key: str
    exchanges: list[Exchange] = field(default_factory=list)

    def files(self) -> list[Path]:
        return sorted(self.transcripts.glob("order-*.jsonl"))


@pytest.fixture
async def live(tmp_path: Path, libp2p_installed: None) -> AsyncIterator[LiveRun]:
    if not pebble_available():
        component_missing("pebble (the pebble and pebble-challtestsrv binaries)")
    hmac_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    options = PebbleOptions(eab_keys={EAB_KID: hmac_key}, nonce_reject_percent=20)
    stack = LocalStack(tmp_path / "stack", pebble_options=options)
    await stack.start()
    try:
        yield LiveRun(
            stack, tmp_path / "transcripts", tmp_path / "data", PrivateKey.generate(), hmac_key
        )
    finally:
        await stack.stop()


async def issue_recorded(run: LiveRun) -> None:
    """One issuance through the embedding API, recorded; every exchange is also kept here."""
    stack = run.stack
    auto = AutoTLS(
        run.identity,
        data_dir=run.data_dir,
        directory_url=stack.pebble.directory_url,
        ca_file=str(stack.pebble.ca_file),
        broker_url=stack.broker_url,
        dns_servers=[stack.dns_server],
        allow_private_addresses=True,
        trust_roots=stack.trust_roots(),
        settings=FAST,
        eab=ExternalAccountBinding.from_base64url(EAB_KID, run.hmac_key),
        forge_auth=FORGE_TOKEN,
        record=run.transcripts,
    )
    auto.observe_http(lambda _service, exchange: run.exchanges.append(exchange))
    node = Libp2pNode(run.identity, listen=LISTEN, autotls=auto)
    async with node, auto:
        async with asyncio.timeout(60):
            await auto.wait_for_certificate()


def refused(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((parts.hostname or "", parts.port or 443)) != 0


async def test_recorded_live_then_replayed_with_pebble_and_the_broker_stopped(
    live: LiveRun,
) -> None:
    await issue_recorded(live)
    directory, broker = live.stack.pebble.directory_url, live.stack.broker_url
    await live.stack.stop()
    assert refused(directory) and refused(broker), "both servers are gone"

    [path] = live.files()
    transcript = read_transcript(path)
    [session] = transcript.sessions
    triggers = [entry["trigger"] for entry in session.journal()]
    assert triggers[-1] == "certificate_installed"
    methods = {(c.port, c.method) for step in session.steps for c in step.calls}
    assert {("acme", "new_order"), ("broker", "register"), ("dns", "check_txt")} <= methods
    assert {("acme", "finalize"), ("installer", "install")} <= methods
    wire = [h["class"] for step in session.steps for c in step.calls for h in c.http]
    assert {"newAccount", "newOrder", "finalize", "challenge_leg", "registration_leg"} <= set(wire)

    report = await assert_replays(path)
    [replayed] = report.sessions
    assert replayed.replayed == replayed.recorded and replayed.recorded
    assert replayed.steps_replayed == len(session.steps)
    assert replayed.calls_replayed == transcript.calls


def _auth_params(value: str | None) -> list[str]:
    """Every parameter of a libp2p-PeerID header but the public key."""
    found = re.findall(r'([A-Za-z-]+)="([^"]*)"', value or "")
    return [v for k, v in found if k.lower() != "public-key"]


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _forms(data: bytes) -> list[str]:
    return [
        base64.urlsafe_b64encode(data).rstrip(b"=").decode(),
        base64.b64encode(data).decode(),
        data.hex(),
    ]


def secret_values(run: LiveRun) -> dict[str, list[str]]:
    """Every secret value that went over the wire in the run, by kind."""
    found: dict[str, list[str]] = {
        "nonce": [],
        "jws signature": [],
        "csr signature": [],
        "eab mac": [],
        "peerid auth": [],
        "forge token": [],
    }
    for exchange in run.exchanges:
        headers = {k.lower(): v for k, v in exchange.request_headers.items()}
        answer = {k.lower(): v for k, v in (exchange.response_headers or {}).items()}
        if "replay-nonce" in answer:
            found["nonce"].append(answer["replay-nonce"])
        if "forge-authorization" in headers:
            found["forge token"].append(headers["forge-authorization"])
        for header in (
            headers.get("authorization"),
            answer.get("www-authenticate"),
            answer.get("authentication-info"),
        ):
            found["peerid auth"] += _auth_params(header)
        if exchange.request_body and exchange.request_body.startswith(b"{"):
            body = json.loads(exchange.request_body)
            if not isinstance(body, dict) or "signature" not in body:
                continue
            found["jws signature"].append(body["signature"])
            protected = json.loads(_b64url_decode(body["protected"]))
            if "nonce" in protected:
                found["nonce"].append(protected["nonce"])
            payload = json.loads(_b64url_decode(body["payload"])) if body["payload"] else {}
            if "csr" in payload:
                csr = x509.load_der_x509_csr(_b64url_decode(payload["csr"]))
                found["csr signature"] += _forms(csr.signature)
            if "externalAccountBinding" in payload:
                found["eab mac"].append(payload["externalAccountBinding"]["signature"])
    return found


async def test_a_recorded_run_leaves_no_secret_value_in_its_transcripts(live: LiveRun) -> None:
    await issue_recorded(live)
    text = "".join(path.read_text() for path in live.files())
    assert text

    wire = secret_values(live)
    for kind, values in wire.items():
        assert values, f"the run sent no {kind}: the check would prove nothing"
    wire["eab hmac key"] = [live.hmac_key, *_forms(_b64url_decode(live.hmac_key))]
    identity = live.identity.to_cryptography().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    wire["identity key"] = _forms(identity) + _forms(live.identity.to_proto())
    leaked = {
        kind: [v for v in values if len(v) >= 8 and v in text] for kind, values in wire.items()
    }
    assert leaked == {kind: [] for kind in wire}

    store = await Store.open(f"sqlite:///{live.data_dir / 'autotls.db'}")
    try:
        keys = [a.key_pem for a in await store.accounts()]
        keys += [c.key_pem for c in await store.certificates()]
    finally:
        await store.close()
    assert len(keys) == 2, "the account key and the certificate key"
    for key in keys:
        assert [m for m in leak_marks(key) if m in text] == []

    # What is written instead keeps its shape: the masked header, the JWS, the CSR.
    assert "Forge-Authorization" in text and FORGE_TOKEN not in text
    assert '"signature":"REDACTED' in text
    assert 'sig=\\"REDACTED' in text and 'public-key=\\"' in text


async def test_autotls_run_records_with_the_environment_and_autotls_replay_replays_it(
    live: LiveRun, tmp_path: Path
) -> None:
    stack = live.stack
    roots = tmp_path / "roots.pem"
    roots.write_text("".join(stack.pebble.issuer_roots_pem()))
    env = {
        "AUTOTLS_RECORD": str(live.transcripts),
        "AUTOTLS_BROKER": stack.broker_url,
        "AUTOTLS_DNS_SERVER": stack.dns_server,
        "AUTOTLS_ALLOW_PRIVATE_ADDRESSES": "1",
        "AUTOTLS_EAB_HMAC_KEY": live.hmac_key,
    }
    argv = [
        "run",
        "--once",
        "--data-dir",
        live.data_dir,
        "--ca",
        stack.pebble.directory_url,
        "--ca-bundle",
        stack.pebble.ca_file,
        "--trust-roots",
        roots,
        "--eab-kid",
        EAB_KID,
        "--listen",
        *LISTEN,
    ]
    ran = await autotls(*argv, env=env)
    assert ran.code == 0, ran.err
    await stack.stop()

    [path] = live.files()
    assert path.stat().st_mode & 0o777 == 0o600
    assert live.transcripts.stat().st_mode & 0o777 == 0o700
    replayed = await autotls("replay", path, env={})
    assert replayed.code == 0, replayed.out + replayed.err
    assert "(certificate_installed)    same" in replayed.out
    assert replayed.out.splitlines()[-1].startswith("identical: ")


@dataclass
class Finished:
    code: int
    out: str
    err: str


async def autotls(*argv: object, env: dict[str, str]) -> Finished:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("AUTOTLS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autotls",
        *[str(a) for a in argv],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**environment, **env},
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(f"autotls {argv[0]} did not finish:\n{err.decode()}")
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())
