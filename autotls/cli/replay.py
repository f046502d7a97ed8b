"""``autotls replay FILE``: re-drive the engine against a recorded transcript, offline.

Prints the recorded journal next to the replayed one and, when they differ, the first
divergence (which step, in which state, at which clock, what the code did and what the
transcript holds). Exit 0 only when the replay is identical; 1 when it diverges; 2 when the
file is not a transcript. Loads neither py-libp2p nor any server: the transcript's servers
may be long gone (:mod:`autotls.recording.replay`).
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from autotls.cli.exits import EXIT_FAILED, EXIT_OK, UsageError
from autotls.cli.output import out

if TYPE_CHECKING:
    from autotls.cli.dispatch import Stop


async def cmd_replay(args: argparse.Namespace, stop: Stop) -> int:
    from autotls.recording import TranscriptError, replay_transcript

    # The replayed engine logs what it does as it did when recorded (every retry a warning):
    # the journals below say it all, so its lines are shown only with -v.
    engine_log = logging.getLogger("autotls")
    level = engine_log.level
    if not args.verbose:
        engine_log.setLevel(logging.ERROR)
    try:
        report = await replay_transcript(args.file)
    except TranscriptError as exc:
        raise UsageError(str(exc)) from None
    finally:
        engine_log.setLevel(level)
    for line in report.render():
        out(line)
    return EXIT_OK if report.identical else EXIT_FAILED
