"""What a replay reports: the first divergence, each session's journals side by side, and how
a port call reads in them. :mod:`autotls.recording.replay` fills these in; ``autotls replay``
prints :meth:`ReplayReport.render`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from autotls.recording.transcript import CallRecord, Transcript

__all__ = [
    "REGENERATE_HINT",
    "Divergence",
    "ReplayMismatch",
    "ReplayReport",
    "SessionReport",
    "render_call",
    "render_moment",
    "render_record",
    "render_value",
]

REGENERATE_HINT = (
    "if the change is intended, record the transcript again (the committed ones: "
    "`python -m tests.replays.record`)"
)

# -- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """The first difference between the code and the transcript."""

    kind: str  # "exchanges" | "decision"
    session: int
    step: int | None
    state: str | None
    clock: datetime | None
    line: int | None
    what: str  # one line: what differs
    code: str  # what the code did
    transcript: str  # what the transcript holds

    def lines(self) -> list[str]:
        where = f"session {self.session}"
        if self.step is not None:
            where += f", step {self.step}"
        if self.state is not None:
            where += f" (order in {self.state}"
            where += f", clock {render_moment(self.clock)})" if self.clock else ")"
        if self.line is not None:
            where += f", transcript line {self.line}"
        heading = {
            "exchanges": "THE EXCHANGES DIFFER",
            "decision": "THE DECISION DIFFERS (same exchanges)",
        }[self.kind]
        explain = {
            "exchanges": "the code now talks to the servers differently than when this "
            f"transcript was recorded; {REGENERATE_HINT}, else it is a regression",
            "decision": "the code answered the recorded exchanges differently: a change of "
            "behaviour (or a bug), not of exchanges",
        }[self.kind]
        return [
            f"DIVERGED in {where}: {heading}",
            f"  {self.what}",
            f"  the code:       {self.code}",
            f"  the transcript: {self.transcript}",
            f"  -> {explain}",
        ]


@dataclass
class SessionReport:
    index: int
    order: int
    peer: str
    steps: int
    steps_replayed: int = 0
    calls_replayed: int = 0
    recorded: list[dict[str, Any]] = field(default_factory=list)
    replayed: list[dict[str, Any]] = field(default_factory=list)
    divergence: Divergence | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ReplayReport:
    path: Path
    transcript: Transcript
    sessions: list[SessionReport] = field(default_factory=list)

    @property
    def divergence(self) -> Divergence | None:
        return next((s.divergence for s in self.sessions if s.divergence is not None), None)

    @property
    def identical(self) -> bool:
        return self.divergence is None and all(s.recorded == s.replayed for s in self.sessions)

    def render(self) -> list[str]:
        t = self.transcript
        out = [
            f"replaying {self.path}: {len(t.sessions)} session(s), {t.steps} step(s), "
            f"{t.calls} port call(s); no network, a throw-away store"
        ]
        out += [f"note: {note}" for note in t.notes]
        for report in self.sessions:
            out.append("")
            out.append(
                f"session {report.index}: order {report.order} of {report.peer}, "
                f"{report.steps_replayed}/{report.steps} step(s) and "
                f"{report.calls_replayed} port call(s) replayed"
            )
            out += [f"  note: {note}" for note in report.notes]
            out += _side_by_side(report.recorded, report.replayed)
            if report.divergence is not None:
                out += report.divergence.lines()
        out.append("")
        if self.identical:
            entries = sum(len(s.recorded) for s in self.sessions)
            out.append(
                f"identical: {entries} journal entr{'y' if entries == 1 else 'ies'}, "
                f"{sum(s.steps_replayed for s in self.sessions)} step(s), "
                f"{sum(s.calls_replayed for s in self.sessions)} port call(s)"
            )
        elif self.divergence is None:
            out.append("DIVERGED: the journals differ (see above)")
        return out


def render_moment(moment: datetime | None) -> str:
    return "-" if moment is None else moment.isoformat()


def _short_time(value: Any) -> str:
    try:
        moment = datetime.fromisoformat(str(value)).astimezone(UTC)
    except ValueError:
        return str(value)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return text + (f".{moment.microsecond // 1000:03d}" if moment.microsecond else "    ")


def _entry_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    text = f"{_short_time(entry.get('at'))}  {entry.get('from')} -> {entry.get('to')}"
    text += f" ({entry.get('trigger')})"
    detail = entry.get("detail") or {}
    if isinstance(detail, dict) and detail.get("error_class"):
        text += f" {detail['error_class']}"
        if detail.get("retry_after") is not None:
            text += f", waits {detail['retry_after']:g} s"
    return text


def _side_by_side(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> list[str]:
    rows = []
    for index in range(max(len(recorded), len(replayed))):
        left = recorded[index] if index < len(recorded) else None
        right = replayed[index] if index < len(replayed) else None
        rows.append(
            (str(index + 1), _entry_text(left), "same" if left == right else _entry_text(right))
        )
    width = max([len(r[1]) for r in rows] + [len("recorded journal")])
    out = [f"  {'#':>3}  {'recorded journal':<{width}}  replayed"]
    out += [f"  {n:>3}  {left:<{width}}  {right}" for n, left, right in rows]
    return out


class ReplayMismatch(AssertionError):
    """A transcript that does not replay identically (:func:`assert_replays`)."""


def render_value(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        ((kind, _),) = value.items()
        if kind in ("pem", "csr", "base64"):
            return f"<{kind}>"
    text = repr(value)
    return text if len(text) <= 90 else text[:87] + "..."


def render_call(port: str, method: str, args: dict[str, Any]) -> str:
    inside = ", ".join(f"{k}={render_value(v)}" for k, v in args.items())
    return f"{port}.{method}({inside})"


def render_record(call: CallRecord) -> str:
    text = render_call(call.port, call.method, call.args)
    wire = [f"{h.get('method')} {h.get('class')} -> {h.get('status')}" for h in call.http]
    if call.error is not None:
        text += f" raising {call.error.get('type', '?').rpartition('.')[2]}"
    return text + (f"  [HTTP: {', '.join(wire)}]" if wire else "")
