"""Record and replay (issue 12 §1-2) on the in-memory fakes: fast, every branch.

* a recorded issuance replays identically, through transient errors with jittered backoff,
  rate limits, an invalid authorization and re-order, a processing order with Retry-After;
* a replay that diverges says where and how: the exchanges differ (another call, one the
  transcript lacks, one too few) or the decision differs (same exchanges);
* errors come back as their own classes; keys and CSR signatures never reach the file;
* the file is capped and says so; a step cut short, an operator's move and a new process
  each read back as they happened;
* the command line: ``autotls replay`` exits 0 / 1 / 2; ``run --record`` and
  ``AUTOTLS_RECORD`` are read and checked.

The same on real Pebble and the local broker: tests/test_recording_live.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from autotls.acme.problems import AlreadyReplaced
from autotls.fsm import operator, steps
from autotls.fsm.errors import AutoTLSError, ReplacesRefusedError, TransientError
from autotls.fsm.machine import State
from autotls.fsm.outcomes import Advance
from autotls.fsm.worker import Worker, run_until_idle
from autotls.recording import (
    Recorder,
    ReplayMismatch,
    TranscriptError,
    assert_replays,
    read_transcript,
    replay_transcript,
)
from autotls.recording.codec import encode, encode_error, revive_error
from autotls.recording.sanitize import (
    SecretValues,
    body_for_transcript,
    mask,
    redact_private_keys,
    sanitize_csr,
    sanitize_headers,
    scrub,
)
from tests.fakes.ports import acme_problem
from tests.fixtures.engine import Engine
from tests.test_engine_steps import leak_marks


@dataclass
class Recorded:
    engine: Engine
    recorder: Recorder
    worker: Worker
    directory: Path

    async def drive(self, until: Any = None) -> None:
        await run_until_idle(
            self.worker,
            advance_clock=self.engine.clock.set,
            stop_when=until or self.engine.settled,
            max_rounds=2000,
        )

    def path(self, order_id: int) -> Path:
        return self.directory / f"order-{order_id}.jsonl"


def recording(engine: Engine, directory: Path, **kwargs: Any) -> Recorded:
    recorder = Recorder(directory, **kwargs)
    worker = Worker(
        engine.store, recorder.wrap(engine.ports), worker_id="recorded", step_observer=recorder
    )
    return Recorded(engine, recorder, worker, directory)


@pytest.fixture
async def recorded(engine: Engine, tmp_path: Path) -> AsyncIterator[Recorded]:
    rec = recording(engine, tmp_path / "transcripts")
    yield rec
    rec.recorder.close()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- round trips ------------------------------------------------------------------------------


async def test_an_issuance_through_every_kind_of_trouble_replays_identically(
    recorded: Recorded,
) -> None:
    engine = recorded.engine
    order = await engine.order()
    engine.ca.fail("register_account", TransientError("connection reset"))
    engine.ca.fail("new_order", acme_problem("rateLimited", "too many", 429, retry_after=3600))
    engine.ca.fail("get_order", TransientError("502 from the load balancer", retry_after=None))
    engine.ca.validation = "invalid"
    engine.ca.processing_polls = 2
    engine.ca.retry_after = 3.0

    async def invalid_once() -> bool:
        journal = await engine.store.journal(order.id)
        if any(j.trigger == "reorder" for j in journal):
            engine.ca.validation = "valid"
        return await engine.settled()

    await recorded.drive(invalid_once)
    recorded.recorder.close()
    snap = await engine.store.get_order(order.id)
    assert snap.state == State.INSTALLED.value

    transcript = read_transcript(recorded.path(order.id))
    journal = transcript.sessions[0].journal()
    errors = [j["detail"]["error_class"] for j in journal if "error_class" in j["detail"]]
    assert errors == ["transient", "rate_limited", "transient", "order_invalid"]
    assert any(step.random for step in transcript.sessions[0].steps), "backoff drew jitter"

    report = await assert_replays(recorded.path(order.id))
    [session] = report.sessions
    assert session.replayed == session.recorded and len(session.recorded) == len(journal)
    assert session.steps_replayed == transcript.steps
    assert session.calls_replayed == transcript.calls > 20
    # The replayed journal is the one the store holds, timestamps included.
    stored = await engine.store.journal(order.id)
    assert [e["trigger"] for e in session.replayed] == [j.trigger for j in stored[1:]]
    assert [e["at"] for e in session.replayed] == [j.at.isoformat() for j in stored[1:]]


async def test_a_renewal_with_replaces_refused_replays_identically(
    engine: Engine, tmp_path: Path
) -> None:
    engine.ca.ari = True
    engine.ca.window = (timedelta(days=50), timedelta(days=55))
    rec = recording(engine, tmp_path / "t")
    order = await engine.order()
    await rec.drive()
    engine.ca.fail(
        "new_order", acme_problem("alreadyReplaced", "certificate already replaced", 409)
    )

    async def renewed() -> bool:
        return (
            len(await engine.store.certificates(order_id=order.id)) == 2
            and (await engine.store.get_order(order.id)).state == State.INSTALLED.value
        )

    await rec.drive(renewed)
    rec.recorder.close()
    triggers = [e["trigger"] for e in read_transcript(rec.path(order.id)).sessions[0].journal()]
    assert "drop_replaces" in triggers and triggers.count("certificate_installed") == 2
    await assert_replays(rec.path(order.id))


# -- divergences ----------------------------------------------------------------------------


async def issued(recorded: Recorded) -> Path:
    order = await recorded.engine.order()
    await recorded.drive()
    recorded.recorder.close()
    return recorded.path(order.id)


async def test_the_code_asking_for_another_exchange_is_reported_as_such(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await issued(recorded)

    async def finalize_without_refetch(snap: Any, ports: Any) -> Any:
        # A "merged poll": finalize straight away, without fetching the order first.
        data = snap.data
        if snap.cert_key_pem is None or not data.get("csr_der"):
            return await original(snap, ports)
        account = steps._account(snap)
        order = await ports.acme.finalize(
            account, data["order_url"], "https://fake-ca.test/finalize/1", b"csr"
        )
        return steps._after_finalize(order, ports.clock.now(), ports)

    original = steps.STEPS[State.VALIDATED]
    monkeypatch.setitem(steps.STEPS, State.VALIDATED, finalize_without_refetch)
    report = await replay_transcript(path)
    assert not report.identical
    divergence = report.divergence
    assert divergence is not None and divergence.kind == "exchanges"
    assert divergence.state == "Validated"
    assert divergence.code.startswith("acme.finalize(account={'url': 'https://fake-ca.test/acct/")
    assert divergence.transcript.startswith("acme.get_order(")
    text = "\n".join(report.render())
    assert "THE EXCHANGES DIFFER" in text
    assert "port call 1 of the step is another call" in text
    assert "python -m tests.replays.record" in text
    # The journal up to the divergence is shown, both sides the same.
    assert report.sessions[0].recorded == report.sessions[0].replayed != []


def sooner_dns_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change of behaviour that makes the same exchanges: the Challenged step gives DNS
    ten minutes instead of fifteen."""
    original = steps.STEPS[State.CHALLENGED]

    async def challenged(snap: Any, ports: Any) -> Any:
        outcome = await original(snap, ports)
        if isinstance(outcome, Advance) and "txt_deadline" in outcome.updates:
            sooner = steps.iso(ports.clock.now() + timedelta(minutes=10))
            outcome = replace(outcome, updates={**outcome.updates, "txt_deadline": sooner})
        return outcome

    monkeypatch.setitem(steps.STEPS, State.CHALLENGED, challenged)


async def test_the_same_exchanges_with_another_decision_is_reported_as_such(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await issued(recorded)
    sooner_dns_deadline(monkeypatch)
    report = await replay_transcript(path)
    divergence = report.divergence
    assert divergence is not None and divergence.kind == "decision", report.render()
    assert divergence.state == "Challenged"
    assert "data.set.txt_deadline" in divergence.what
    assert "THE DECISION DIFFERS (same exchanges)" in "\n".join(report.render())


async def test_a_call_the_transcript_lacks_and_a_call_too_few_are_named(
    recorded: Recorded, tmp_path: Path
) -> None:
    path = await issued(recorded)
    records = lines(path)
    first_call = next(i for i, r in enumerate(records) if r["t"] == "call")
    dropped = tmp_path / "dropped.jsonl"
    dropped.write_text(
        "".join(json.dumps(r) + "\n" for i, r in enumerate(records) if i != first_call)
    )
    report = await replay_transcript(dropped)
    assert report.divergence is not None
    assert report.divergence.what == "the code asks for a port call the transcript lacks"
    assert report.divergence.code == "acme.generate_account_key()"
    assert "nothing more in step 1: it made 0 port call(s) when recorded" in (
        report.divergence.transcript
    )

    extra = dict(records[first_call], method="supports_ari", args={})
    padded = tmp_path / "padded.jsonl"
    padded.write_text(
        "".join(
            json.dumps(r) + "\n" + (json.dumps(extra) + "\n" if i == first_call else "")
            for i, r in enumerate(records)
        )
    )
    report = await replay_transcript(padded)
    assert report.divergence is not None and report.divergence.kind == "exchanges"
    assert report.divergence.what == "the step ended after 1 port call(s); the transcript has 2"
    assert report.divergence.transcript.startswith("next: acme.supports_ari()")


async def test_a_changed_answer_in_the_transcript_changes_the_decision(
    recorded: Recorded, tmp_path: Path
) -> None:
    path = await issued(recorded)
    records = lines(path)
    for record in records:
        if record["t"] == "call" and record["method"] == "check_txt":
            record["result"]["visible"] = False
            break
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = await replay_transcript(edited)
    assert report.divergence is not None and report.divergence.kind == "decision"
    assert report.divergence.state == "BrokerNotified"
    assert report.divergence.what.startswith("the step decided otherwise: to")


# -- errors, secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        acme_problem("rateLimited", "too many certificates", 429, retry_after=3600),
        ReplacesRefusedError("refused", problem={"type": "x", "detail": "y"}),
        AlreadyReplaced("urn:ietf:params:acme:error:alreadyReplaced", "gone", status=409),
        TransientError("reset", retry_after=12.5),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_come_back_as_their_own_class(error: AutoTLSError) -> None:
    revived, note = revive_error(json.loads(json.dumps(encode_error(error))))
    assert note is None
    assert type(revived) is type(error)
    assert isinstance(revived, AutoTLSError)
    assert (revived.message, revived.error_class, revived.retry_after, revived.problem) == (
        error.message,
        error.error_class,
        error.retry_after,
        error.problem,
    )
    assert str(revived) == str(error)


def test_an_error_class_that_no_longer_exists_is_revived_as_its_class_and_said() -> None:
    encoded = encode_error(TransientError("reset"))
    encoded["type"] = "autotls.gone.VanishedError"
    revived, note = revive_error(encoded)
    assert type(revived) is AutoTLSError and revived.error_class.value == "transient"
    assert (
        note == "autotls.gone.VanishedError no longer exists: replayed as AutoTLSError (transient)"
    )
    bug, _ = revive_error(encode_error(KeyError("order_url")))
    assert type(bug) is KeyError and str(bug) == "'order_url'"
    foreign, _ = revive_error(
        {"type": "aiohttp.client_exceptions.ClientPayloadError", "args": ["x"]}
    )
    assert type(foreign).__name__ == "ClientPayloadError" and str(foreign) == "x"


async def test_no_key_and_no_csr_signature_reach_the_transcript(recorded: Recorded) -> None:
    path = await issued(recorded)
    text = path.read_text()
    store = recorded.engine.store
    keys = [a.key_pem for a in await store.accounts()] + [
        c.key_pem for c in await store.certificates()
    ]
    assert len(keys) == 2
    for key in keys:
        assert [m for m in leak_marks(key) if m in text] == []
    assert "REDACTED" in text  # the keys' placeholders, the same shape
    csrs = [r["args"]["csr_der"]["csr"] for r in lines(path) if r.get("method") == "finalize"]
    assert csrs and all(base64.b64decode(c).endswith(bytes(64)) for c in csrs)


def test_masks_keep_the_shape_and_are_idempotent() -> None:
    assert mask("abcDEF123_-") == "REDACTEDRED"
    assert mask("abcd=") == "REDA=" and mask(mask("abcd==")) == mask("abcd==")
    pem = "x\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\nAwEHoUQD==\n-----END EC PRIVATE KEY-----\n"
    redacted = redact_private_keys(pem)
    assert redacted == (
        "x\n-----BEGIN EC PRIVATE KEY-----\nREDACTED\nREDACTED==\n-----END EC PRIVATE KEY-----\n"
    )
    assert redact_private_keys(redacted) == redacted
    assert sanitize_csr(b"not a csr") == bytes(9)


def test_exchange_secrets_are_masked_and_remembered_for_scrubbing() -> None:
    secrets = SecretValues(["configured-forge-token"])
    headers = sanitize_headers(
        {
            "Authorization": 'libp2p-PeerID opaque="OPAQUEsecretOPAQUE", sig="SIGsecretSIG=="',
            "WWW-Authenticate": 'libp2p-PeerID challenge-client="CHALLENGEclient", '
            'public-key="CAESIPUBLIC", sig="SERVERsig123"',
            "Authentication-Info": 'libp2p-PeerID sig="xSIGxSIGx", bearer="BEARERtoken123"',
            "Replay-Nonce": "NONCEnonce123",
            "Forge-Authorization": "configured-forge-token",
            "Content-Type": "application/json",
        },
        secrets,
    )
    assert headers["Authorization"] == (
        'libp2p-PeerID opaque="REDACTEDREDACTEDRE", sig="REDACTEDREDA=="'
    )
    assert 'public-key="CAESIPUBLIC"' in headers["WWW-Authenticate"]
    assert "BEARERtoken123" not in json.dumps(headers) and "NONCEnonce123" not in json.dumps(
        headers
    )
    assert headers["Content-Type"] == "application/json"
    # A server echoing a secret in an error message: scrubbed from every written string.
    assert scrub({"detail": "bad token BEARERtoken123, nonce NONCEnonce123"}, secrets) == {
        "detail": "bad token REDACTEDREDACT, nonce REDACTEDREDAC"
    }
    assert scrub("configured-forge-token", secrets) == mask("configured-forge-token")


def test_a_jws_keeps_its_shape_without_nonce_or_signatures() -> None:
    def b64(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    eab = {
        "protected": b64({"alg": "HS256", "kid": "kid-1"}),
        "payload": "e30",
        "signature": "EABmacEABmac",
    }
    body = json.dumps(
        {
            "protected": b64({"alg": "ES256", "nonce": "NONCEnonce123", "url": "https://ca/x"}),
            "payload": b64({"termsOfServiceAgreed": True, "externalAccountBinding": eab}),
            "signature": "SIGNATUREsignature",
        }
    ).encode()
    secrets = SecretValues()
    written = body_for_transcript(body, {"Content-Type": "application/jose+json"}, secrets)
    jws = written["jws"]
    assert jws["signature"] == mask("SIGNATUREsignature")
    assert jws["decoded"]["protected"]["nonce"] == mask("NONCEnonce123")
    assert jws["decoded"]["payload"]["externalAccountBinding"]["signature"] == mask("EABmacEABmac")
    text = json.dumps(written)
    assert not any(s in text for s in ("NONCEnonce123", "SIGNATUREsignature", "EABmacEABmac"))
    # Still a JWS: three base64url members that decode to JSON.
    decoded = json.loads(base64.urlsafe_b64decode(jws["protected"] + "=="))
    assert decoded["url"] == "https://ca/x"


def test_values_encode_without_keys() -> None:
    from autotls.fsm.ports import AcmeAccount

    assert encode(AcmeAccount(b"-----BEGIN PRIVATE KEY-----\nabc\n-----END", "u")) == {"url": "u"}


# -- the file ---------------------------------------------------------------------------------


async def test_a_transcript_is_capped_says_so_and_replays_up_to_there(
    engine: Engine, tmp_path: Path
) -> None:
    rec = recording(engine, tmp_path / "t", limit=12_000)
    order = await engine.order()
    await rec.drive()
    rec.recorder.close()
    path = rec.path(order.id)
    assert path.stat().st_size <= 12_000
    last = lines(path)[-1]
    assert last["t"] == "truncated" and last["limit_bytes"] == 12_000
    assert "reached its size limit" in last["reason"]
    report = await assert_replays(path)
    assert any("cut at its 12000-byte limit" in n for n in report.sessions[0].notes)
    assert path.stat().st_mode & 0o777 == 0o600


async def test_an_operator_move_between_steps_starts_a_new_session(
    recorded: Recorded,
) -> None:
    engine = recorded.engine
    order = await engine.order()
    await recorded.drive()
    await recorded.worker.run_once()  # Installed: plans the renewal
    await operator.force_renewal(engine.store, order.id, now=engine.clock.now(), actor="operator")
    await recorded.drive()
    recorded.recorder.close()
    transcript = read_transcript(recorded.path(order.id))
    assert len(transcript.sessions) == 2
    second = transcript.sessions[1]
    assert second.start["state"] == State.RENEW_DUE.value
    assert "moved outside this worker" in second.header["note"]
    assert second.start["certificate"]["serial"]
    report = await assert_replays(recorded.path(order.id))
    assert [s.steps_replayed for s in report.sessions] == [s.steps for s in report.sessions]


async def test_a_step_cut_short_is_written_at_close_and_replayed_that_far(
    recorded: Recorded,
) -> None:
    engine = recorded.engine
    order = await engine.order()
    await recorded.drive(lambda: _in_state(engine, order.id, State.CHALLENGED))
    entered = asyncio.Event()

    async def hanging_health() -> Any:
        entered.set()
        await asyncio.Event().wait()  # never answers: the worker is stopped meanwhile

    engine.broker.health = hanging_health  # type: ignore[method-assign]
    task = asyncio.ensure_future(recorded.worker.run_once())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    recorded.recorder.close()
    transcript = read_transcript(recorded.path(order.id))
    last = transcript.sessions[0].steps[-1]
    assert last.end is None and last.state == State.CHALLENGED.value
    report = await assert_replays(recorded.path(order.id))
    assert any("cut short" in note for note in report.sessions[0].notes)


async def _in_state(engine: Engine, order_id: int, state: State) -> bool:
    return (await engine.store.get_order(order_id)).state == state.value


async def test_a_line_cut_by_a_crash_is_reported_and_ignored(
    recorded: Recorded, tmp_path: Path
) -> None:
    path = await issued(recorded)
    cut = tmp_path / "cut.jsonl"
    cut.write_text(path.read_text() + '{"t":"step","step":99,"or')
    report = await assert_replays(cut)
    assert any("cut short" in n for n in report.transcript.notes)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"t":"session"}\nnot json\n{"t":"step"}\n')
    with pytest.raises(TranscriptError, match=r"line 1: 'session' record lacks 'format'"):
        read_transcript(broken)


async def test_assert_replays_raises_with_the_whole_report(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await issued(recorded)
    sooner_dns_deadline(monkeypatch)
    with pytest.raises(ReplayMismatch) as raised:
        await assert_replays(path)
    message = str(raised.value)
    assert "recorded journal" in message and "DIVERGED in session 1, step" in message


# -- the command line ----------------------------------------------------------------------------


async def test_the_replay_command_exits_by_the_outcome(
    recorded: Recorded,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_cli import arun_cli

    path = await issued(recorded)
    same = await arun_cli(capsys, "replay", path)
    assert same.code == 0, same.err
    assert same.out.splitlines()[-1].startswith("identical: 7 journal entries")
    assert "recorded journal" in same.out

    sooner_dns_deadline(monkeypatch)
    differs = await arun_cli(capsys, "replay", path)
    assert differs.code == 1
    assert "THE DECISION DIFFERS" in differs.out

    junk = tmp_path / "junk.jsonl"
    junk.write_text("[1, 2]\n")
    refused = await arun_cli(capsys, "replay", junk)
    assert refused.code == 2
    assert refused.err.strip() == f"autotls: error: {junk}: line 1 is not a transcript record"


def test_run_reads_record_from_the_flag_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autotls.cli.exits import UsageError
    from autotls.cli.options import parse_arguments
    from autotls.cli.settings import node_settings

    for name in [n for n in __import__("os").environ if n.startswith("AUTOTLS_")]:
        monkeypatch.delenv(name)
    base = ["run", "--data-dir", str(tmp_path / "d")]
    assert node_settings(parse_arguments(base)).record is None
    flagged = node_settings(parse_arguments([*base, "--record", str(tmp_path / "t")]))
    assert flagged.record == tmp_path / "t"
    monkeypatch.setenv("AUTOTLS_RECORD", str(tmp_path / "env"))
    assert node_settings(parse_arguments(base)).record == tmp_path / "env"
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("AUTOTLS_RECORD", str(a_file))
    with pytest.raises(UsageError, match=r"^AUTOTLS_RECORD: .*file is not a directory$"):
        node_settings(parse_arguments(base))


@pytest.mark.parametrize(
    ("protocol", "routed"),
    [
        ("AcmePort", "RoutedAcme"),
        ("BrokerPort", "RoutedBroker"),
        ("DnsPort", "RoutedDns"),
        ("InstallerPort", "RoutedInstaller"),
    ],
)
def test_every_port_method_is_recorded_and_replayed(protocol: str, routed: str) -> None:
    """A method added to a port protocol must be routed too, or the recorder would pass it by
    unseen and a replay could not answer it (mypy says so as well)."""
    import inspect

    from autotls.fsm import ports
    from autotls.recording import ports as routed_ports

    declared = {
        name
        for name, member in vars(getattr(ports, protocol)).items()
        if not name.startswith("_") and callable(member)
    }
    implemented = getattr(routed_ports, routed)
    assert declared <= set(dir(implemented))
    for name in declared:
        want = inspect.signature(getattr(getattr(ports, protocol), name))
        have = inspect.signature(getattr(implemented, name))
        assert list(want.parameters) == list(have.parameters), name


async def test_the_replay_command_loads_no_libp2p(recorded: Recorded, tmp_path: Path) -> None:
    from tests.test_startup import probe

    path = await issued(recorded)
    code, out, loaded = await asyncio.to_thread(probe, tmp_path, "replay", path)
    assert code == 0 and "identical" in out
    assert not loaded & {"libp2p", "trio", "prometheus_client"}, loaded


async def test_orders_stepped_side_by_side_each_get_a_transcript_that_replays(
    recorded: Recorded,
) -> None:
    """Two orders of one store share its ACME account: what one order did to it reaches the
    other's transcript as a new session, so each replays alone."""
    engine = recorded.engine
    first = await engine.order()
    await recorded.drive(lambda: _in_state(engine, first.id, State.CHALLENGED))
    second = await engine.order()  # adopts the account the first one registered
    await recorded.drive()
    recorded.recorder.close()
    sessions = []
    for order in (first, second):
        report = await assert_replays(recorded.path(order.id))
        sessions.append(len(report.sessions))
        assert report.sessions[-1].recorded[-1]["trigger"] == "certificate_installed"
    assert sessions == [1, 2]  # the second order found the account the first one made
    notes = [
        s.header.get("note", "")
        for order in (first, second)
        for s in read_transcript(recorded.path(order.id)).sessions
    ]
    assert any("ACME account was changed by another order" in n for n in notes)


async def test_a_step_whose_commit_failed_is_replayed_without_its_commit(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = recorded.engine
    order = await engine.order()
    commit = engine.store.commit
    failures = [1]

    async def failing_once(*args: Any, **kwargs: Any) -> bool:
        snap = args[0]
        if snap.state == State.DNS_PROPAGATED.value and failures:
            failures.pop()
            raise OSError("disk I/O error")
        return await commit(*args, **kwargs)

    monkeypatch.setattr(engine.store, "commit", failing_once)
    await recorded.drive()
    recorded.recorder.close()
    monkeypatch.undo()
    transcript = read_transcript(recorded.path(order.id))
    [lost] = [s for s in transcript.sessions[0].steps if not s.committed]
    assert lost.state == State.DNS_PROPAGATED.value and lost.end is not None
    report = await assert_replays(recorded.path(order.id))
    assert report.sessions[0].steps_replayed == transcript.steps
