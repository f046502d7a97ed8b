"""Replay: the real worker, steps and policy, driven again by a transcript's answers.

What this module owns, and nothing else: :func:`replay_transcript` (the report it fills in,
and how a divergence reads, are :mod:`autotls.recording.report`'s). For each session of a
transcript (:mod:`autotls.recording.transcript`):

1. a throw-away SQLite store is seeded with the order as the session's first step found it
   (state, data, attempts, due time, account, in-flight key and certificate; keys are the
   masked placeholders the transcript holds);
2. a :class:`~autotls.fsm.worker.Worker` runs with ports that answer from the transcript
   (:class:`ReplayRouter`), a :class:`~autotls.fsm.clock.ManualClock` and a random source
   that serves the recorded draws;
3. for each recorded step, the clock is set to the instant the step began and the worker
   runs once: it must claim the order (it is due), find it in the recorded state, make the
   recorded port calls in order with the recorded arguments (each is answered with the
   recorded result or error, and the clock moves to the recorded reading after it), and end
   with the recorded decision (state, due time, attempts, error, journal entry, data,
   effects). A step the recording never saw committed is replayed with its commit dropped.

The first difference stops the replay and is reported: which session, step and state, at
which clock, the transcript line, what the code did and what the transcript holds -- with
the kind of difference, because the two mean different things: *the exchanges differ* (the
code asks for another call, or for one the transcript lacks, or stops short: it now talks to
the servers differently, and the transcript must be recorded again if that is intended) or
*the decision differs* (the same answers led elsewhere: a change of behaviour, or a bug).
The replayed journal is printed next to the recorded one.

Nothing here touches a network: the transcript's servers may be long gone.
"""

from __future__ import annotations

import random
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from autotls.fsm.clock import ManualClock
from autotls.fsm.data import FENCE_KEYS
from autotls.fsm.faults import FaultPlan
from autotls.fsm.machine import State, Trigger
from autotls.fsm.ports import EngineSettings, Ports
from autotls.fsm.worker import Worker
from autotls.persistence.records import (
    AccountUpdate,
    CommitPlan,
    JournalRecord,
    NewAccount,
    NewCertificate,
    OrderSnapshot,
)
from autotls.persistence.store import Store
from autotls.recording.codec import TranscriptError, decode, encode, revive_error
from autotls.recording.ports import (
    Live,
    LiveSync,
    RoutedAcme,
    RoutedBroker,
    RoutedDns,
    RoutedInstaller,
)
from autotls.recording.report import (
    Divergence,
    ReplayMismatch,
    ReplayReport,
    SessionReport,
    render_call,
    render_moment,
    render_record,
    render_value,
)
from autotls.recording.transcript import (
    Session,
    StepRecord,
    end_record,
    normalised,
    read_transcript,
)

__all__ = [
    "Divergence",
    "ReplayMismatch",
    "ReplayReport",
    "ReplayRouter",
    "SessionReport",
    "assert_replays",
    "replay_transcript",
]

# A key the seeded account holds: never compared (AcmeAccount's key is not written).
_SEED_ACCOUNT_KEY = b"-----BEGIN PRIVATE KEY-----\nREDACTED\n-----END PRIVATE KEY-----\n"
# Long enough that the worker's lease keeper never wakes during a replayed step.
_REPLAY_LEASE = timedelta(days=3650)


# -- the ports that answer from a transcript ----------------------------------------------------


class _Stop(BaseException):
    """Ends a replayed step at once, whatever the step and the worker would catch: a
    divergence is not the order's error, and the policy must not turn it into a retry."""

    def __init__(self, divergence: Divergence | None) -> None:
        super().__init__(divergence.what if divergence else "end of the recording")
        self.divergence = divergence


class _ReplayRandom(random.Random):
    """Serves the current step's recorded draws; past them, a fixed sequence (a replayed
    decision that then differs is reported as such)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.draws: list[float] = []

    def random(self) -> float:
        if self.draws:
            return self.draws.pop(0)
        return super().random()


class ReplayRouter:
    """Answers port calls from one session of a transcript, step by step; the worker's step
    observer too (it learns where each step begins and what it decided)."""

    def __init__(self, session: Session, index: int, clock: ManualClock) -> None:
        self.session = session
        self.index = index
        self.clock = clock
        self.rng = _ReplayRandom()
        self.step: StepRecord | None = None
        self.position = 0
        self.calls_replayed = 0
        self.divergence: Divergence | None = None
        self.ended: dict[str, Any] | None = None
        self.notes: list[str] = []

    def expect(self, step: StepRecord) -> None:
        self.step, self.position, self.ended = step, 0, None
        self.rng.draws = list(step.random)

    def diverge(self, kind: str, what: str, code: str, transcript: str, line: int | None) -> None:
        if self.divergence is not None:
            return
        step = self.step
        self.divergence = Divergence(
            kind,
            self.index,
            step.number if step else None,
            step.state if step else None,
            self.clock.now(),
            line if line is not None else (step.line if step else None),
            what,
            code,
            transcript,
        )

    # -- StepObserver --------------------------------------------------------------------------

    def step_started(self, snap: OrderSnapshot) -> None:
        step = self.step
        if step is not None and snap.state != step.state:
            self.diverge(
                "decision",
                "the order is in another state when the step begins",
                f"the order is in {snap.state}",
                f"step {step.number} ran in {step.state}",
                step.line,
            )

    def step_ended(
        self, snap: OrderSnapshot, plan: CommitPlan, *, now: datetime, committed: bool
    ) -> None:
        self.ended = end_record(snap, plan, now=now, committed=committed)

    # -- Router -----------------------------------------------------------------------------------

    async def call(
        self, port: str, method: str, args: dict[str, Any], returns: Any, live: Live
    ) -> Any:
        return self._answer(port, method, args, returns)

    def call_sync(
        self, port: str, method: str, args: dict[str, Any], returns: Any, live: LiveSync
    ) -> Any:
        return self._answer(port, method, args, returns)

    def _answer(self, port: str, method: str, args: dict[str, Any], returns: Any) -> Any:
        if self.divergence is not None:
            raise _Stop(self.divergence)
        step = self.step
        assert step is not None, "a port call outside a replayed step"
        asked = normalised(encode(args))
        code = render_call(port, method, asked)
        if self.position >= len(step.calls):
            if step.end is None:
                self.notes.append(
                    f"step {step.number} was cut short when recorded (the process stopped "
                    f"mid-step) after {len(step.calls)} port call(s): replayed that far"
                )
                raise _Stop(None)
            self.diverge(
                "exchanges",
                "the code asks for a port call the transcript lacks",
                code,
                f"nothing more in step {step.number}: it made {len(step.calls)} port "
                "call(s) when recorded",
                step.line,
            )
            raise _Stop(self.divergence)
        recorded = step.calls[self.position]
        if (port, method, asked) != (recorded.port, recorded.method, recorded.args):
            what = (
                f"port call {self.position + 1} of the step has other arguments"
                if (port, method) == (recorded.port, recorded.method)
                else f"port call {self.position + 1} of the step is another call"
            )
            if (port, method) == (recorded.port, recorded.method):
                changed = [
                    k for k in {**asked, **recorded.args} if asked.get(k) != recorded.args.get(k)
                ]
                what += f" ({', '.join(changed)})"
            self.diverge("exchanges", what, code, render_record(recorded), recorded.line)
            raise _Stop(self.divergence)
        self.position += 1
        self.calls_replayed += 1
        if recorded.clock_after is not None and recorded.clock_after > self.clock.now():
            self.clock.set(recorded.clock_after)
        if recorded.error is not None:
            if recorded.error.get("type") == "interrupted":
                self.notes.append(
                    f"step {step.number} was cut short inside {port}.{method} when recorded: "
                    "replayed that far"
                )
                raise _Stop(None)
            error, note = revive_error(recorded.error, f"line {recorded.line}: error")
            if note is not None and note not in self.notes:
                self.notes.append(note)
            raise error
        return decode(recorded.result, returns, f"line {recorded.line}: result")


class _ReplayStore(Store):
    """The throw-away store; a step the recording never committed is not committed here."""

    drop_commits = False

    async def commit(
        self, snapshot: OrderSnapshot, plan: CommitPlan, *, now: datetime, worker: str
    ) -> bool:
        if self.drop_commits:
            return False
        return await super().commit(snapshot, plan, now=now, worker=worker)


# -- the replay ------------------------------------------------------------------------------------


async def replay_transcript(path: str | Path, *, workdir: Path | None = None) -> ReplayReport:
    """Replay every session of the transcript at ``path``; raises :class:`TranscriptError`
    when it cannot be read, and reports (never raises) a divergence."""
    transcript = read_transcript(Path(path))
    report = ReplayReport(Path(path), transcript)
    with tempfile.TemporaryDirectory(prefix="autotls-replay-", dir=workdir) as tmp:
        for index, session in enumerate(transcript.sessions, start=1):
            result = await _replay_session(session, index, Path(tmp))
            report.sessions.append(result)
            if result.divergence is not None:
                break
    return report


async def assert_replays(path: str | Path) -> ReplayReport:
    """For tests: the transcript at ``path`` replays identically, or :class:`ReplayMismatch`
    with the whole report (journals side by side, the first divergence)."""
    report = await replay_transcript(path)
    if not report.identical:
        raise ReplayMismatch("\n".join(report.render()))
    return report


def _start_moment(session: Session) -> datetime:
    due: datetime = decode(session.start["next_run_at"], datetime, "start.next_run_at")
    moments = [due]
    moments += [s.at for s in session.steps[:1] if s.at is not None]
    return min(moments)


async def _replay_session(session: Session, index: int, tmp: Path) -> SessionReport:
    header = session.header
    report = SessionReport(index, int(header["order"]), str(header["peer"]), len(session.steps))
    report.recorded = [_journal_entry(e) for e in session.journal()]
    if header.get("note"):
        report.notes.append(str(header["note"]))
    settings = decode(header["settings"], EngineSettings, f"line {session.line}: settings")
    directory_url = str(header["directory_url"])
    clock = ManualClock(_start_moment(session))
    router = ReplayRouter(session, index, clock)
    ports = Ports(
        acme=RoutedAcme(router, None, directory_url),
        broker=RoutedBroker(router, None),
        dns=RoutedDns(router, None),
        installer=RoutedInstaller(router, None),
        clock=clock,
        settings=settings,
        rng=router.rng,
    )
    store = await _ReplayStore.open(f"sqlite:///{tmp / f'session-{index}.db'}")
    try:
        order_id = await _seed(store, session, clock)
        seeded = len(await store.journal(order_id))
        worker = Worker(
            store,
            ports,
            worker_id="replay",
            concurrency=1,
            lease=_REPLAY_LEASE,
            faults=FaultPlan(),
            step_observer=router,
            store_retries=None,
        )
        for step in session.steps:
            if not await _replay_step(step, router, worker, store, clock, order_id):
                break
            report.steps_replayed += 1
        report.replayed = [
            _journal_entry(_stored_entry(e)) for e in (await store.journal(order_id))[seeded:]
        ]
    finally:
        await store.close()
    report.calls_replayed = router.calls_replayed
    report.divergence = router.divergence
    report.notes += router.notes
    if session.truncated is not None:
        report.notes.append(
            f"the transcript was cut at its {session.truncated.get('limit_bytes')}-byte limit "
            f"(step {session.truncated.get('step')}): replayed up to there"
        )
    if report.divergence is not None:
        # Only what was decided before the divergence is comparable.
        report.recorded = report.recorded[: len(report.replayed)]
    return report


async def _replay_step(
    step: StepRecord,
    router: ReplayRouter,
    worker: Worker,
    store: _ReplayStore,
    clock: ManualClock,
    order_id: int,
) -> bool:
    """Run one recorded step again; False when the replay must stop here."""
    if step.at is not None and step.at > clock.now():
        clock.set(step.at)
    router.expect(step)
    store.drop_commits = not step.committed
    before = await store.get_order(order_id)
    try:
        claimed = await worker.run_once()
    except _Stop:
        return False
    if claimed == 0:
        router.diverge(
            "decision",
            "the order is not due when the recording ran this step",
            f"the order is due at {render_moment(before.next_run_at)}",
            f"step {step.number} ran at {render_moment(step.at)}",
            step.line,
        )
        return False
    if router.divergence is not None:
        return False
    if router.position < len(step.calls):
        nxt = step.calls[router.position]
        router.diverge(
            "exchanges",
            f"the step ended after {router.position} port call(s); the transcript has "
            f"{len(step.calls)}",
            "no further port call",
            f"next: {render_record(nxt)}",
            nxt.line,
        )
        return False
    if step.end is None:
        router.notes.append(
            f"step {step.number} was cut short when recorded (the process stopped mid-step): "
            "replayed that far"
        )
        return False
    ended = router.ended
    recorded = {k: v for k, v in step.end.items() if k not in ("t", "step")}
    if ended is None:
        router.diverge("decision", "the step ended without a decision", "-", "-", step.line)
        return False
    difference = _first_difference(recorded, _aligned_fences(ended, before.fence + 1 - step.fence))
    if difference is not None:
        key, was, now = difference
        router.diverge(
            "decision",
            f"the step decided otherwise: {key}",
            f"{key} = {render_value(now)}",
            f"{key} = {render_value(was)}",
            step.end_line,
        )
        return False
    if not step.committed:
        snap = await store.get_order(order_id)
        await store.release(snap.id, snap.fence)
    return True


def _aligned_fences(ended: dict[str, Any], offset: int) -> dict[str, Any]:
    """The decision with the claim fences it wrote into the data (``FENCE_KEYS``) counted
    as the recording counted them: the replay's store claims once more to seed the order."""
    data = ended.get("data")
    written = data.get("set") if isinstance(data, dict) else None
    if not offset or not isinstance(data, dict) or not isinstance(written, dict):
        return ended
    if not any(isinstance(written.get(k), int) for k in FENCE_KEYS):
        return ended
    fixed = {
        k: v - offset if k in FENCE_KEYS and isinstance(v, int) else v for k, v in written.items()
    }
    return {**ended, "data": {**data, "set": fixed}}


def _first_difference(recorded: Any, replayed: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        for key in [*recorded, *(k for k in replayed if k not in recorded)]:
            found = _first_difference(
                recorded.get(key), replayed.get(key), f"{path}.{key}" if path else key
            )
            if found is not None:
                return found
        return None
    if recorded != replayed:
        return path or "value", recorded, replayed
    return None


async def _seed(store: Store, session: Session, clock: ManualClock) -> int:
    """The order as the session found it, in a fresh store."""
    header, start = session.header, session.start
    where = f"line {session.line}: start"
    now = clock.now()
    await store.create_order(
        str(header["peer"]),
        str(header["identifier"]),
        initial_state=State.NEW.value,
        now=now,
        trigger=Trigger.CREATE.value,
        actor="replay",
    )
    [claimed] = await store.claim_due("replay-seed", now=now, lease_seconds=60, limit=1)
    if not isinstance(claimed, OrderSnapshot):
        raise TranscriptError(f"{where}: the seeded order cannot be read back")
    account = start.get("account")
    certificate = start.get("certificate")
    cert_key = decode(start.get("cert_key_pem"), bytes | None, f"{where}.cert_key_pem")
    plan = CommitPlan(
        to_state=str(start["state"]),
        data=decode(start.get("data") or {}, dict[str, Any], f"{where}.data"),
        next_run_at=decode(start["next_run_at"], datetime, f"{where}.next_run_at"),
        attempts=int(start.get("attempts") or 0),
        last_error_class=start.get("last_error_class"),
        last_error_message=start.get("last_error_message"),
        last_problem=start.get("last_problem"),
        new_account=None
        if account is None
        else NewAccount(str(account["directory_url"]), _SEED_ACCOUNT_KEY),
        account_update=None
        if account is None
        else AccountUpdate(account.get("url"), str(account.get("status"))),
        cert_key_pem=cert_key,
        new_certificate=None
        if certificate is None
        else NewCertificate(
            chain_pem=str(certificate["chain_pem"]),
            key_pem=_SEED_ACCOUNT_KEY,
            serial=str(certificate["serial"]),
            cert_id=certificate.get("cert_id"),
            not_before=decode(certificate["not_before"], datetime, f"{where}.not_before"),
            not_after=decode(certificate["not_after"], datetime, f"{where}.not_after"),
            acme_order_url=certificate.get("acme_order_url"),
            replaces_cert_id=certificate.get("replaces_cert_id"),
        ),
    )
    if not await store.commit(claimed, plan, now=now, worker="replay-seed"):
        raise TranscriptError(f"{where}: the order could not be seeded")
    return claimed.id


def _stored_entry(entry: JournalRecord) -> dict[str, Any]:
    return {
        "kind": entry.kind,
        "trigger": entry.trigger,
        "from": entry.from_state,
        "to": entry.to_state,
        "at": encode(entry.at),
        "detail": encode(entry.detail),
    }


def _journal_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A journal entry in the form both sides are compared in."""
    at = entry.get("at")
    moment = decode(at, datetime, "journal.at") if isinstance(at, str) else at
    return normalised(
        {
            "kind": entry.get("kind"),
            "trigger": entry.get("trigger"),
            "from": entry.get("from"),
            "to": entry.get("to"),
            "at": encode(moment),
            "detail": entry.get("detail"),
        }
    )
