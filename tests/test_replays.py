"""The committed transcripts of tests/replays/ (issue 12 §3): behaviours no local server
produces, recorded live against the fake Let's Encrypt CA, the local broker and the fault proxy
(``python -m tests.replays.record`` records them all again). Each replays identically in CI --
offline, without Pebble, the broker or py-libp2p -- and each is checked for the behaviour it
exists for, so that a transcript that lost it fails here rather than replaying nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from autotls.localstack.pebble import PebbleStack
from autotls.recording import assert_replays, read_transcript
from autotls.recording.transcript import CallRecord, Session, Transcript
from tests.replays.record import SCENARIOS, record

REPLAYS = Path(__file__).parent / "replays"


def calls(session: Session, method: str) -> list[CallRecord]:
    return [c for step in session.steps for c in step.calls if c.method == method]


def triggers(session: Session) -> list[str]:
    return [entry["trigger"] for entry in session.journal()]


def errors(session: Session) -> list[dict[str, Any]]:
    return [e for e in session.journal() if e["kind"] == "error"]


def check_rate_limited(session: Session) -> None:
    [limited] = errors(session)
    detail = limited["detail"]
    assert (limited["from"], detail["error_class"], detail["retry_after"]) == (
        "Registered",
        "rate_limited",
        3600,
    )
    assert detail["problem"]["type"] == "urn:ietf:params:acme:error:rateLimited"
    assert "too many certificates (5) already issued" in detail["problem"]["detail"]
    refused, placed = calls(session, "new_order")
    assert refused.error is not None and placed.error is None
    [http] = refused.http
    assert http["status"] == 429 and http["response"]["headers"]["Retry-After"] == "3600"
    # The next newOrder came exactly an hour later, no sooner.
    steps = [s for s in session.steps if s.calls and s.calls[0].method == "new_order"]
    assert steps[1].at is not None and steps[0].at is not None
    assert steps[1].at - steps[0].at == timedelta(seconds=3600)
    assert triggers(session)[-1] == "certificate_installed"


def check_already_replaced(session: Session) -> None:
    orders = calls(session, "new_order")
    assert [c.args["replaces"] is not None for c in orders] == [False, True, False]
    refused = orders[1]
    assert refused.error is not None
    assert refused.error["type"] == "autotls.fsm.errors.ReplacesRefusedError"
    assert refused.error["problem"]["type"] == "urn:ietf:params:acme:error:alreadyReplaced"
    assert refused.http[-1]["status"] == 409
    assert calls(session, "renewal_info"), "the renewal followed the CA's ARI window"
    moves = triggers(session)
    assert moves.count("certificate_installed") == 2
    assert moves[moves.index("renewal_due") :][:3] == [
        "renewal_due",
        "start_renewal",
        "drop_replaces",
    ]


def check_authz_invalid(session: Session) -> None:
    statuses = [c.result["status"] for c in calls(session, "get_authorization") if c.result]
    assert "invalid" in statuses
    [reorder] = [e for e in session.journal() if e["trigger"] == "reorder"]
    assert reorder["from"] == "DNSPropagated"
    assert reorder["detail"]["error_class"] == "order_invalid"
    assert "Incorrect TXT record" in reorder["detail"]["message"]
    assert len(calls(session, "new_order")) == 2
    assert triggers(session)[-1] == "certificate_installed"


def check_finalize_processing(session: Session) -> None:
    [finalized] = calls(session, "finalize")
    assert (finalized.result["status"], finalized.result["retry_after"]) == ("processing", 3)
    assert finalized.http[-1]["response"]["headers"]["Retry-After"] == "3"
    polls = [c.result["status"] for c in calls(session, "get_order") if c.result]
    assert polls[-3:] == ["processing", "processing", "valid"]
    # Each poll came when Retry-After said: three seconds after the answer before it (the
    # first, three seconds after the DNSPropagated step that finalized).
    finalized_at = [s.at for s in session.steps if s.state == "DNSPropagated" and s.at][-1]
    validated = [s.at for s in session.steps if s.state == "Validated" and s.at is not None]
    gaps = [b - a for a, b in itertools.pairwise([finalized_at, *validated])]
    assert gaps == [timedelta(seconds=3)] * 3
    assert triggers(session)[-1] == "certificate_installed"


def check_unknown_challenge(session: Session) -> None:
    authorization = calls(session, "get_authorization")[0].result
    assert [c["type"] for c in authorization["challenges"]] == ["dns-persist-01", "dns-01"]
    [answered] = calls(session, "answer_challenge")
    dns01 = authorization["challenges"][1]
    assert answered.args["url"] == dns01["url"]
    assert errors(session) == []
    assert triggers(session)[-1] == "certificate_installed"


def check_broker_storm(session: Session) -> None:
    storm = errors(session)
    assert [e["from"] for e in storm] == ["Challenged"] * 5
    assert {e["detail"]["error_class"] for e in storm} == {"transient"}
    assert all(e["detail"]["message"].startswith("broker fault 502") for e in storm)
    pages = [
        h
        for c in calls(session, "register")
        for h in c.http
        if h["status"] == 502 and "text/html" in h["response"]["headers"].get("Content-Type", "")
    ]
    assert [h["class"] for h in pages] == ["challenge_leg"] * 3 + ["registration_leg"] * 2
    # Backoff between the attempts grew.
    attempts = [s.at for s in session.steps if s.state == "Challenged" and s.at is not None]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert triggers(session)[-1] == "certificate_installed"


CHECKS: dict[str, Callable[[Session], None]] = {
    "rate-limited": check_rate_limited,
    "already-replaced": check_already_replaced,
    "authz-invalid": check_authz_invalid,
    "finalize-processing": check_finalize_processing,
    "unknown-challenge": check_unknown_challenge,
    "broker-502-storm": check_broker_storm,
}


def test_every_scenario_has_a_committed_transcript_and_a_check() -> None:
    assert set(CHECKS) == set(SCENARIOS)
    assert {p.stem for p in REPLAYS.glob("*.jsonl")} == set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(CHECKS))
async def test_a_committed_transcript_replays_identically(name: str) -> None:
    path = REPLAYS / f"{name}.jsonl"
    transcript: Transcript = read_transcript(path)
    [session] = transcript.sessions
    CHECKS[name](session)
    report = await assert_replays(path)
    assert report.sessions[0].steps_replayed == len(session.steps)
    assert report.sessions[0].calls_replayed == transcript.calls


@pytest.mark.usefixtures("libp2p_installed")
async def test_the_regeneration_command_records_a_transcript_that_replays(
    pebble: PebbleStack, tmp_path: Path
) -> None:
    [path] = await record(["finalize-processing"], tmp_path, pebble)
    check_finalize_processing(read_transcript(path).sessions[0])
    await assert_replays(path)
