"""Record an order's steps, and replay them (issue 12).

* :class:`Recorder` (``autotls run --record DIR``, ``AutoTLS(record=DIR)``) writes one
  transcript per order, ``DIR/order-<id>.jsonl``: every port call the engine's steps make, in
  order, with its arguments and result or classified error, the HTTP exchanges made during
  it, the engine's clock readings and random draws, the state each step ran in and what it
  decided (the journal entry included). Sanitised as it is written; capped in size.
* :func:`replay_transcript` (``autotls replay FILE``) re-drives the real worker, steps and
  policy against the recorded answers with a manual clock at the recorded instants and a
  throw-away store, and reports the first divergence; :func:`assert_replays` is the same for
  tests.

The rooms: :mod:`~autotls.recording.sanitize` (what is never written),
:mod:`~autotls.recording.codec` (port values and errors as JSON),
:mod:`~autotls.recording.transcript` (the file), :mod:`~autotls.recording.ports` (the ports
with every call routed through one place), :mod:`~autotls.recording.recorder`,
:mod:`~autotls.recording.replay` and :mod:`~autotls.recording.report` (what a replay says).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autotls._lazy import lazy_exports

if TYPE_CHECKING:
    from autotls.recording.codec import TranscriptError
    from autotls.recording.recorder import Recorder
    from autotls.recording.replay import (
        Divergence,
        ReplayMismatch,
        ReplayReport,
        assert_replays,
        replay_transcript,
    )
    from autotls.recording.transcript import DEFAULT_LIMIT, read_transcript, transcript_path

# Each public name and its module, loaded on first use (autotls._lazy): `autotls run`
# without --record needs only DEFAULT_LIMIT, not the recorder and the replay.
_EXPORTS: dict[str, str] = {
    "TranscriptError": "autotls.recording.codec",
    "Recorder": "autotls.recording.recorder",
    "Divergence": "autotls.recording.replay",
    "ReplayMismatch": "autotls.recording.replay",
    "ReplayReport": "autotls.recording.replay",
    "assert_replays": "autotls.recording.replay",
    "replay_transcript": "autotls.recording.replay",
    "DEFAULT_LIMIT": "autotls.recording.transcript",
    "read_transcript": "autotls.recording.transcript",
    "transcript_path": "autotls.recording.transcript",
}

__all__ = [
    "DEFAULT_LIMIT",
    "Divergence",
    "Recorder",
    "ReplayMismatch",
    "ReplayReport",
    "TranscriptError",
    "assert_replays",
    "read_transcript",
    "replay_transcript",
    "transcript_path",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
