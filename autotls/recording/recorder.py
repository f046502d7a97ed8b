"""Recording: every step the worker runs, written down at the port boundary.

What this module owns, and nothing else: :class:`Recorder`, which the embedding API
(``AutoTLS(record=DIR)``) and ``autotls run --record DIR`` put between the worker and its
ports. It is three things at once:

* the worker's :class:`~autotls.fsm.worker.StepObserver`: a step begins (in its own task: a
  context variable carries "this step" to every port call made from it) and ends (the plan,
  committed or not, becomes the step's ``end`` line);
* the ports' :class:`~autotls.recording.ports.Router`: each port call is made, then written
  with its arguments and its result or classified error; the HTTP exchanges the adapters
  made meanwhile (their observer hook, :meth:`http_observer`) are nested under it;
* the engine's clock and random source (:meth:`wrap`): within a step the clock reads the
  same instant until the next port call (one real reading per stretch between two calls,
  written down), and every random draw is written down. The replay serves both back, so the
  engine computes the very same deadlines and backoffs. (Only the ``now`` the engine uses
  inside one step is affected: the microseconds it spends computing between two exchanges.)

Why the port boundary: a replay then re-drives the real worker, steps and policy with ports
that answer from the transcript -- independent of signatures, nonces, freshly generated keys,
nonce pools, connection reuse and every other detail below the ports, which may change
without invalidating a transcript. What a transcript cannot reproduce is handled explicitly:

* keys: ``generate_account_key`` / ``generate_certificate_key`` are port calls like any
  other; their result is written as a PEM block of the same shape with its body masked, and a
  replay hands that placeholder to the engine, which only stores it and passes it back to
  ports (a replay never needs the recorded key);
* the CSR is written with its signature zeroed, and so is every CSR argument, in the order's
  data and in the finalize request: a replay compares them in that form;
* the installer's effect (files, the live TLS context) stays local: a replay answers
  ``install`` with the recorded verdict and writes nothing.

Nothing here may change what the engine decides or stop it: a transcript that cannot be
written stops recording that order, with one warning.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from autotls.fsm.clock import Clock
from autotls.fsm.errors import ConfigurationError
from autotls.fsm.ports import Ports
from autotls.http import Exchange, Observer
from autotls.persistence.records import CommitPlan, OrderSnapshot
from autotls.recording.codec import encode, encode_error
from autotls.recording.ports import (
    Live,
    LiveSync,
    RoutedAcme,
    RoutedBroker,
    RoutedDns,
    RoutedInstaller,
)
from autotls.recording.sanitize import (
    SecretValues,
    body_for_transcript,
    sanitize_headers,
    scrub,
)
from autotls.recording.transcript import (
    DEFAULT_LIMIT,
    FORMAT,
    TranscriptFile,
    end_record,
    normalised,
    start_record,
    transcript_path,
)

log = logging.getLogger(__name__)


def autotls_version() -> str:
    try:
        return metadata.version("autotls")
    except metadata.PackageNotFoundError:  # pragma: no cover - a bare checkout
        return "unknown"


@dataclass
class _Step:
    """One step being recorded (the context variable's value while it runs)."""

    order_id: int
    number: int
    snap: OrderSnapshot
    at: datetime | None = None
    frozen: datetime | None = None  # the clock's reading until the next port call
    random: list[float] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    call: dict[str, Any] | None = None  # the port call under way (HTTP exchanges go here)


@dataclass
class _OrderLog:
    file: TranscriptFile
    steps: int = 0  # in the current session
    fence: int | None = None
    state: str | None = None
    account: tuple[str | None, str] | None = None  # (url, status) as this order's steps left it
    pending: _Step | None = None


def _account_of(snap: OrderSnapshot) -> tuple[str | None, str] | None:
    return None if snap.account is None else (snap.account.url, snap.account.status)


# A port call that never returned (the step was cancelled): a replay stops there.
_INTERRUPTED = {"type": "interrupted", "args": []}

_CURRENT: contextvars.ContextVar[_Step | None] = contextvars.ContextVar(
    "autotls_recording_step", default=None
)


class _RecordingClock:
    """The engine's clock, as the recorder sees it: outside a step, the clock itself; in a
    step, one reading per stretch between port calls, written down."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> datetime:
        step = _CURRENT.get()
        if step is None:
            return self._clock.now()
        if step.frozen is None:
            step.frozen = self._clock.now()
            if step.at is None:
                step.at = step.frozen
            elif step.calls and step.calls[-1].get("clock_after") is None:
                step.calls[-1]["clock_after"] = step.frozen.isoformat()
        return step.frozen

    async def sleep_until(self, deadline: datetime, wake: Any = None) -> None:
        await self._clock.sleep_until(deadline, wake)


class _RecordingRandom(random.Random):
    """The engine's random source; in a step, every draw is written down."""

    def __init__(self, source: random.Random) -> None:
        super().__init__()
        self._source = source

    def random(self) -> float:
        value = self._source.random()
        step = _CURRENT.get()
        if step is not None:
            step.random.append(value)
        return value


class Recorder:
    """Writes ``order-<id>.jsonl`` in ``directory`` for every order the worker steps.

    ``limit``: the size cap of each transcript, in bytes. ``secrets``: values that must never
    be written even if a server echoes them (the ``Forge-Authorization`` token, the EAB HMAC
    key); the secrets seen in exchanges are added as they pass. Give :meth:`http_observer`
    to the adapters, :meth:`wrap` the ports, the recorder itself to the worker as its
    ``step_observer``, and :meth:`close` it at the end (a step cut short is written then)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        limit: int = DEFAULT_LIMIT,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.directory = Path(directory)
        self.limit = limit
        self.secrets = SecretValues(s for s in secrets if s)
        self._orders: dict[int, _OrderLog] = {}
        self._ports: Ports | None = None
        self._created = False

    # -- setting up --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory (0700) now, so that a bad ``--record`` stops a start
        (:class:`~autotls.fsm.errors.ConfigurationError` naming it)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigurationError(
                f"cannot record transcripts in {self.directory}: {reason}"
            ) from None
        self._created = True
        log.info("recording every order's steps in %s", self.directory)

    def wrap(self, ports: Ports) -> Ports:
        """``ports`` with every port call, clock reading and random draw of a step recorded."""
        wrapped = dataclasses.replace(
            ports,
            acme=RoutedAcme(self, ports.acme, ports.acme.directory_url),
            broker=RoutedBroker(self, ports.broker),
            dns=RoutedDns(self, ports.dns),
            installer=RoutedInstaller(self, ports.installer),
            clock=_RecordingClock(ports.clock),
            rng=_RecordingRandom(ports.rng),
        )
        self._ports = ports
        return wrapped

    def http_observer(self, service: str) -> Observer:
        """An HTTP observer for the adapters of ``service`` (``acme``, ``broker``)."""
        return lambda exchange: self.observe_http(service, exchange)

    # -- StepObserver ----------------------------------------------------------------------

    def step_started(self, snap: OrderSnapshot) -> None:
        order = self._order(snap.id)
        if order.pending is not None:
            self._flush(order, order.pending, None)  # a step that never ended
        note = self._discontinuity(order, snap)
        if order.fence is None or note is not None:
            self._start_session(order, snap, note)
        order.steps += 1
        step = _Step(snap.id, order.steps, snap)
        order.pending = step
        order.fence, order.state, order.account = snap.fence, snap.state, _account_of(snap)
        _CURRENT.set(step)

    def step_ended(
        self, snap: OrderSnapshot, plan: CommitPlan, *, now: datetime, committed: bool
    ) -> None:
        order = self._orders.get(snap.id)
        step = _CURRENT.get()
        _CURRENT.set(None)
        if order is None or step is None or order.pending is not step:
            return
        order.pending = None
        if committed:
            order.state = plan.to_state
            if plan.account_update is not None:
                order.account = (plan.account_update.url, plan.account_update.status)
            elif plan.new_account is not None:
                order.account = (None, "unregistered")  # unless another order made it first
        self._flush(order, step, end_record(snap, plan, now=now, committed=committed))

    @staticmethod
    def _discontinuity(order: _OrderLog, snap: OrderSnapshot) -> str | None:
        """Why ``snap`` is not what this order's own last step left (a replay then starts a
        new session from ``snap``), or None."""
        if order.fence is None:
            return None
        if snap.fence != order.fence + 1 or snap.state != order.state:
            return (
                "the order was moved outside this worker since its last step (an operator's "
                "command, or another process): a new session starts here"
            )
        if _account_of(snap) != order.account:
            # The store shares one ACME account among its orders: another order registered
            # it, or the CA forgot it while another order was stepped.
            return (
                "the order's ACME account was changed by another order: a new session starts here"
            )
        return None

    def close(self) -> None:
        """Write the steps that never ended (the process stopped mid-step)."""
        for order in self._orders.values():
            if order.pending is not None:
                self._flush(order, order.pending, None)
                order.pending = None

    # -- Router ------------------------------------------------------------------------------

    async def call(
        self, port: str, method: str, args: dict[str, Any], returns: Any, live: Live
    ) -> Any:
        assert live is not None, "a recording makes the real call"
        record = self._begin(port, method, args)
        try:
            result = await live()
        except Exception as exc:
            self._done(record, error=exc)
            raise
        except BaseException:  # cancelled: the step ends here, undecided
            self._done(record, interrupted=True)
            raise
        self._done(record, result=result)
        return result

    def call_sync(
        self, port: str, method: str, args: dict[str, Any], returns: Any, live: LiveSync
    ) -> Any:
        assert live is not None, "a recording makes the real call"
        record = self._begin(port, method, args)
        try:
            result = live()
        except Exception as exc:
            self._done(record, error=exc)
            raise
        self._done(record, result=result)
        return result

    def _begin(self, port: str, method: str, args: dict[str, Any]) -> dict[str, Any] | None:
        step = _CURRENT.get()
        if step is None:
            return None  # a port call outside a step (none in the engine): not recorded
        record: dict[str, Any] = {
            "t": "call",
            "step": step.number,
            "port": port,
            "method": method,
            "args": encode(args),
            "http": [],
        }
        step.call = record
        return record

    def _done(
        self,
        record: dict[str, Any] | None,
        *,
        result: Any = None,
        error: BaseException | None = None,
        interrupted: bool = False,
    ) -> None:
        step = _CURRENT.get()
        if record is None or step is None:
            return
        http = record.pop("http")
        if interrupted:
            record["error"] = _INTERRUPTED
        elif error is not None:
            record["error"] = encode_error(error)
        else:
            record["result"] = encode(result)
        record["clock_after"] = None  # the next reading of the clock, if any
        record["http"] = http
        step.calls.append(record)
        step.call = None
        step.frozen = None  # the next reading is a new one

    # -- HTTP ------------------------------------------------------------------------------------

    def observe_http(self, service: str, exchange: Exchange) -> None:
        """Nest ``exchange`` under the port call it was made for (sanitised at once: the
        exchange itself holds every secret)."""
        step = _CURRENT.get()
        if step is None or step.call is None:
            return
        secrets = self.secrets
        response: dict[str, Any] | None = None
        if exchange.status is not None or exchange.response_body is not None:
            response = {
                "headers": sanitize_headers(exchange.response_headers, secrets),
                "body": body_for_transcript(
                    exchange.response_body, exchange.response_headers, secrets
                ),
            }
        step.call["http"].append(
            {
                "service": service,
                "class": exchange.request_class,
                "method": exchange.method,
                "url": exchange.url,
                "status": exchange.status,
                "elapsed_ms": round(exchange.elapsed * 1000, 1),
                "request": {
                    "headers": sanitize_headers(exchange.request_headers, secrets),
                    "body": body_for_transcript(
                        exchange.request_body, exchange.request_headers, secrets
                    ),
                },
                "response": response,
                "error": None
                if exchange.error is None
                else f"{type(exchange.error).__name__}: {exchange.error}",
            }
        )

    # -- writing ---------------------------------------------------------------------------------

    def _order(self, order_id: int) -> _OrderLog:
        order = self._orders.get(order_id)
        if order is None:
            if not self._created:
                self.prepare()
            path = transcript_path(self.directory, order_id)
            order = self._orders[order_id] = _OrderLog(TranscriptFile(path, self.limit))
        return order

    def _start_session(self, order: _OrderLog, snap: OrderSnapshot, note: str | None) -> None:
        ports = self._ports
        header: dict[str, Any] = {
            "t": "session",
            "format": FORMAT,
            "autotls": autotls_version(),
            "order": snap.id,
            "peer": snap.peer_id,
            "identifier": snap.identifier,
            "directory_url": ports.acme.directory_url if ports is not None else None,
            "settings": normalised(encode(ports.settings)) if ports is not None else None,
            "limit_bytes": self.limit,
            "start": start_record(snap),
        }
        if note is not None:
            header["note"] = note
        order.steps = 0
        order.file.write([scrub(header, self.secrets)])

    def _flush(self, order: _OrderLog, step: _Step, end: dict[str, Any] | None) -> None:
        lines: list[dict[str, Any]] = [
            {
                "t": "step",
                "step": step.number,
                "order": step.order_id,
                "state": step.snap.state,
                "fence": step.snap.fence,
                "at": step.at.isoformat() if step.at is not None else None,
                "random": list(step.random),
            },
            *step.calls,
        ]
        if step.call is not None:  # cut short inside a port call
            lines.append({**step.call, "error": _INTERRUPTED})
        if end is not None:
            lines.append({"t": "end", "step": step.number, **end})
        order.file.write([scrub(line, self.secrets) for line in lines], step=step.number)
