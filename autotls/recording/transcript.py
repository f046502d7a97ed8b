"""The transcript file: one order's steps as the engine ran them, one JSON object a line.

What this module owns, and nothing else: the format (:data:`FORMAT`), writing it within a size
limit (:class:`TranscriptFile`), reading it back (:func:`read_transcript`), and the two
records that both the recorder and the replay build from the engine's own values, so that
they compare like with like (:func:`start_record`, :func:`end_record`).

A file ``order-<id>.jsonl`` holds one or more *sessions*; a session is what one worker saw of
the order without interruption: a ``session`` line (format, autotls version, the order, the
ACME directory, the engine's settings, and the order as the first step found it), then per
step, written together when the step ended:

``step``
    the step number, the state it ran in, the claim's fence, ``at`` (the engine's clock when
    the step began) and ``random`` (the draws the engine made from its random source);
``call``
    one per port call, in order: ``port`` and ``method``, ``args`` and ``result`` or
    ``error`` (sanitised: :mod:`autotls.recording.sanitize`), ``clock_after`` (the clock
    the engine read after the call, if it read it), and ``http``: the HTTP exchanges the
    adapter made during the call, for the reader (a replay never needs them);
``end``
    the result: ``committed``, the state moved to, ``next_run_at``, attempts, the error
    class and message, the journal entry written (if any), what the step did to the order's
    data (keys set, keys dropped), and the store-side effects (account, in-flight key,
    certificate).

A new session starts when a worker claims the order after something else moved it (an
operator's ``renew --force`` or ``retry``, another process) or when a new process records it.
When the file reaches its size limit a ``truncated`` line says so and nothing more is written.
A line cut short by a crash mid-write is reported when read, and ignored.

Clock readings: within a step the recorded clock stands still between port calls (the
recorder reads it once per stretch between two calls), so the replay, setting its manual clock
to the same instants, computes every deadline and timestamp exactly as the run did.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from autotls.persistence.records import KEEP, CommitPlan, OrderSnapshot
from autotls.recording.codec import TranscriptError, decode, encode
from autotls.recording.sanitize import sanitize_csr

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_LIMIT = 8 * 1024 * 1024
# Room kept for the line that says the transcript was cut.
_TRUNCATION_RESERVE = 512
_J = TypeVar("_J")


def transcript_path(directory: Path, order_id: int) -> Path:
    return directory / f"order-{order_id}.jsonl"


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"


def normalised(value: _J) -> _J:
    """``value`` as it reads back from a transcript (tuples as lists, floats as JSON has them)."""
    read: _J = json.loads(json.dumps(value))
    return read


# -- the records both sides build ------------------------------------------------------------


def sanitize_order_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """An order's ``data`` as a transcript holds it: the CSR's signature zeroed."""
    import base64
    import binascii

    copy = dict(data)
    csr = copy.get("csr_der")
    if isinstance(csr, str):
        try:
            der = base64.b64decode(csr, validate=True)
        except (ValueError, binascii.Error):
            der = csr.encode()
        copy["csr_der"] = base64.b64encode(sanitize_csr(der)).decode("ascii")
    encoded: dict[str, Any] = encode(copy)
    return encoded


def data_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What a step did to the order's data: the keys it set (new values, sanitised) and the
    keys it dropped."""
    written = {k: v for k, v in after.items() if k not in before or before[k] != v}
    return {
        "set": sanitize_order_data(written),
        "dropped": sorted(k for k in before if k not in after),
    }


def start_record(snap: OrderSnapshot) -> dict[str, Any]:
    """The order as a session's first step found it: what a replay seeds its store with."""
    account = snap.account
    cert = snap.certificate
    return normalised(
        {
            "state": snap.state,
            "data": sanitize_order_data(snap.data),
            "fence": snap.fence,
            "attempts": snap.attempts,
            "next_run_at": encode(snap.next_run_at),
            "created_at": encode(snap.created_at),
            "last_error_class": snap.last_error_class,
            "last_error_message": encode(snap.last_error_message),
            "last_problem": encode(snap.last_problem),
            "account": None
            if account is None
            else {
                "directory_url": account.directory_url,
                "url": account.url,
                "status": account.status,
            },
            # Masked (same shape): a replay seeds the store with it, and the installer's and
            # make_csr's arguments then read as they did.
            "cert_key_pem": encode(snap.cert_key_pem),
            "certificate": None
            if cert is None
            else {
                "chain_pem": cert.chain_pem,
                "serial": cert.serial,
                "cert_id": cert.cert_id,
                "not_before": encode(cert.not_before),
                "not_after": encode(cert.not_after),
                "acme_order_url": cert.acme_order_url,
                "replaces_cert_id": cert.replaces_cert_id,
                "revoked_at": encode(cert.revoked_at),
                "revocation_reason": cert.revocation_reason,
            },
        }
    )


def end_record(
    snap: OrderSnapshot, plan: CommitPlan, *, now: datetime, committed: bool
) -> dict[str, Any]:
    """What a step decided (the worker's plan) and whether it was written."""
    journal = None
    if plan.journal is not None:
        journal = {
            "kind": plan.journal.kind,
            "trigger": plan.journal.trigger,
            "from": snap.state,
            "to": plan.to_state,
            "at": encode(now),
            "detail": encode(plan.journal.detail),
        }
    cert_key = (
        None if plan.cert_key_pem is KEEP else ("cleared" if plan.cert_key_pem is None else "set")
    )
    new_cert = plan.new_certificate
    effects = {
        "new_account": plan.new_account is not None,
        "account": None
        if plan.account_update is None
        else {"url": plan.account_update.url, "status": plan.account_update.status},
        "cert_key": cert_key,
        "certificate": None
        if new_cert is None
        else {
            "serial": new_cert.serial,
            "cert_id": new_cert.cert_id,
            "not_before": encode(new_cert.not_before),
            "not_after": encode(new_cert.not_after),
            "acme_order_url": new_cert.acme_order_url,
            "replaces_cert_id": new_cert.replaces_cert_id,
        },
        "revocation": encode(plan.revocation),
    }
    return normalised(
        {
            "committed": committed,
            "to": plan.to_state,
            "next_run_at": encode(plan.next_run_at),
            "attempts": plan.attempts,
            "error_class": plan.last_error_class,
            "error": encode(plan.last_error_message),
            "journal": journal,
            "data": data_change(snap.data, plan.data),
            "effects": effects,
        }
    )


# -- writing -----------------------------------------------------------------------------------


class TranscriptFile:
    """Appends whole steps to one order's transcript, never past ``limit`` bytes. The first
    write that does not fit is replaced by a ``truncated`` line, and the file is closed for
    good. A failing disk stops the recording of this order (one warning), never the engine."""

    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT) -> None:
        self.path = path
        self.limit = limit
        self.closed = False
        self.truncated = False
        self._size: int | None = None

    def write(self, records: list[dict[str, Any]], *, step: int | None = None) -> bool:
        """Append ``records`` as lines, all or none. False once the file takes no more."""
        if self.closed:
            return False
        text = "".join(_json_line(r) for r in records).encode("utf-8")
        try:
            if self._size is None:
                self._size = self.path.stat().st_size if self.path.exists() else 0
            if self._size + len(text) > self.limit - _TRUNCATION_RESERVE:
                marker = _json_line(
                    {
                        "t": "truncated",
                        "step": step,
                        "limit_bytes": self.limit,
                        "reason": "the transcript reached its size limit; nothing after this "
                        "point was recorded",
                    }
                ).encode("utf-8")
                self._append(marker)
                self.truncated = self.closed = True
                log.warning(
                    "transcript %s reached its %d-byte limit: recording of this order stopped",
                    self.path,
                    self.limit,
                )
                return False
            self._append(text)
        except OSError as exc:
            self.closed = True
            log.warning(
                "cannot write transcript %s: %s; recording of this order stopped",
                self.path,
                exc.strerror or exc,
            )
            return False
        return True

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)
        assert self._size is not None
        self._size += len(data)


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallRecord:
    line: int
    port: str
    method: str
    args: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    clock_after: datetime | None
    http: list[Any]


@dataclass(frozen=True)
class StepRecord:
    line: int
    number: int
    state: str
    fence: int
    at: datetime | None
    random: list[float]
    calls: list[CallRecord]
    end: dict[str, Any] | None  # None: the step never ended (the process stopped mid-step)
    end_line: int | None = None

    @property
    def committed(self) -> bool:
        return self.end is not None and bool(self.end.get("committed"))


@dataclass(frozen=True)
class Session:
    line: int
    header: dict[str, Any]
    steps: list[StepRecord]
    truncated: dict[str, Any] | None

    @property
    def start(self) -> dict[str, Any]:
        start: dict[str, Any] = self.header["start"]
        return start

    def journal(self) -> list[dict[str, Any]]:
        """The journal entries the recorded steps wrote, in order."""
        return [
            step.end["journal"]
            for step in self.steps
            if step.end is not None and step.committed and step.end.get("journal") is not None
        ]


@dataclass
class Transcript:
    path: Path
    sessions: list[Session] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(len(step.calls) for s in self.sessions for step in s.steps)

    @property
    def steps(self) -> int:
        return sum(len(s.steps) for s in self.sessions)


def _need(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], line: int) -> Any:
    if key not in record:
        raise TranscriptError(f"{_where(line)}: {record.get('t')!r} record lacks {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TranscriptError(f"{_where(line)}: {key!r} has the wrong type")
    return value


def _where(line: int) -> str:
    return f"line {line}"


def _time(value: Any, line: int, key: str) -> datetime | None:
    if value is None:
        return None
    moment: datetime = decode(value, datetime, f"{_where(line)}: {key}")
    return moment


def read_transcript(path: Path) -> Transcript:
    """Parse the transcript at ``path``; raises :class:`TranscriptError` naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TranscriptError(f"cannot read transcript {path}: {exc.strerror or exc}") from None
    transcript = Transcript(path)
    lines = raw.split(b"\n")
    session: Session | None = None
    step: dict[str, Any] | None = None
    for index, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError:
            if index == len(lines) or (index == len(lines) - 1 and not lines[-1].strip()):
                transcript.notes.append(
                    f"{_where(index)} is cut short (the recording process stopped mid-write): "
                    "ignored"
                )
                continue
            raise TranscriptError(f"{path}: {_where(index)} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("t"), str):
            raise TranscriptError(f"{path}: {_where(index)} is not a transcript record")
        kind = record["t"]
        try:
            if kind == "session":
                _finish_step(session, step)
                step = None
                version = _need(record, "format", int, index)
                if version != FORMAT:
                    raise TranscriptError(
                        f"{_where(index)}: transcript format {version}, this autotls reads "
                        f"format {FORMAT}"
                    )
                for key in ("order", "peer", "identifier", "directory_url", "settings", "start"):
                    _need(record, key, object, index)
                _need(record, "start", dict, index)
                _need(record["start"], "state", str, index)
                session = Session(index, record, [], None)
                transcript.sessions.append(session)
                continue
            if session is None:
                raise TranscriptError(f"{_where(index)}: a {kind!r} record before any session")
            if session.truncated is not None:
                raise TranscriptError(f"{_where(index)}: a record after the truncation mark")
            if kind == "step":
                _finish_step(session, step)
                step = {
                    "line": index,
                    "number": _need(record, "step", int, index),
                    "state": _need(record, "state", str, index),
                    "fence": _need(record, "fence", int, index),
                    "at": _time(record.get("at"), index, "at"),
                    "random": [float(v) for v in _need(record, "random", list, index)],
                    "calls": [],
                    "end": None,
                    "end_line": None,
                }
            elif kind == "call":
                if step is None or step["end"] is not None:
                    raise TranscriptError(f"{_where(index)}: a call outside a step")
                error = record.get("error")
                if error is not None and not isinstance(error, dict):
                    raise TranscriptError(f"{_where(index)}: 'error' must be an object")
                step["calls"].append(
                    CallRecord(
                        line=index,
                        port=_need(record, "port", str, index),
                        method=_need(record, "method", str, index),
                        args=_need(record, "args", dict, index),
                        result=record.get("result"),
                        error=error,
                        clock_after=_time(record.get("clock_after"), index, "clock_after"),
                        http=list(record.get("http") or []),
                    )
                )
            elif kind == "end":
                if step is None or step["end"] is not None:
                    raise TranscriptError(f"{_where(index)}: an end outside a step")
                _need(record, "committed", bool, index)
                step["end"], step["end_line"] = record, index
            elif kind == "truncated":
                _finish_step(session, step)
                step = None
                session = Session(session.line, session.header, session.steps, record)
                transcript.sessions[-1] = session
            else:
                transcript.notes.append(f"{_where(index)}: unknown record {kind!r} ignored")
        except TranscriptError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise TranscriptError(f"{path}: {exc}") from None
    _finish_step(session, step)
    if not transcript.sessions:
        raise TranscriptError(f"{path}: no session in the transcript (is it empty?)")
    return transcript


def _finish_step(session: Session | None, step: dict[str, Any] | None) -> None:
    if session is not None and step is not None:
        session.steps.append(StepRecord(**step))
