"""The process: parse, pick the command, run it under signals and logging, and turn how it
ended into an exit code and, on failure, one line on stderr.

SIGINT and SIGTERM ask ``run`` to stop cleanly (a second one, or either signal to any other
command, cancels it). The one-line error never carries a secret value (see
:func:`autotls.cli.settings.secret_values`); ``--verbose`` adds the scrubbed traceback.

Until the arguments are parsed only the parser is loaded: ``--help``, ``--version`` and usage
errors answer without asyncio, logging or any command's module (the imports inside
:func:`_execute` and :func:`commands` are deliberate).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from autotls.cli.exits import EXIT_OK, EXIT_USAGE, UsageError
from autotls.cli.options import PROG, parse_arguments
from autotls.cli.output import err, one_line

if TYPE_CHECKING:
    import asyncio


class Stop:
    """A stop request from a signal: which one, and the event ``run`` waits on."""

    def __init__(self) -> None:
        import asyncio

        self.event: asyncio.Event = asyncio.Event()
        self.signal_name: str | None = None


Command = Callable[[argparse.Namespace, Stop], Awaitable[int]]


def commands() -> dict[str, Command]:
    """Each command's coroutine function, by the name it has on the command line."""
    from autotls.cli import admin, orders, replay, run

    return {
        "demo": run.cmd_demo,
        "run": run.cmd_run,
        "status": orders.cmd_status,
        "diagram": orders.cmd_diagram,
        "db": admin.cmd_db,
        "renew": orders.cmd_renew,
        "retry": orders.cmd_retry,
        "revoke": orders.cmd_revoke,
        "account": admin.cmd_account,
        "replay": replay.cmd_replay,
    }


async def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; SIGINT/SIGTERM ask ``run`` to stop cleanly (a second one, or any
    signal to another command, cancels it)."""
    import asyncio
    import contextlib
    import signal
    import threading

    command = commands()[args.command]
    stop = Stop()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    graceful = args.command == "run"
    installed: list[int] = []

    def on_signal(signum: int) -> None:
        already = stop.signal_name is not None
        if not already:
            stop.signal_name = signal.Signals(signum).name
            stop.event.set()
        if (already or not graceful) and task is not None:
            task.cancel()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
    try:
        return await command(args, stop)
    finally:
        for number in installed:
            loop.remove_signal_handler(number)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Returns the exit code (never raises, bar a bug in this function).

    Without ``argv`` it reads ``sys.argv`` and takes it that the process ends when it
    returns (the console script, ``python -m autotls``); with ``argv`` it may be one call of
    many in a longer-lived process (tests), and leaves the interpreter as it found it."""
    try:
        args = parse_arguments(None if argv is None else list(argv))
    except UsageError as exc:
        err(f"{PROG}: error: {one_line(str(exc))}")
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    return _execute(args, process_ends=argv is None)


# Commands that run for long (a node, the demo's local stack) and so need the cyclic garbage
# collector. The others finish in a fraction of a second: the collector's passes over the
# objects SQLAlchemy creates while it is imported cost them about a tenth of their time, and
# the few cycles they make are freed when the process ends (or, in process, once it is back
# on after the command).
_LONG_RUNNING = frozenset({"run", "demo"})


def _execute(args: argparse.Namespace, *, process_ends: bool) -> int:
    import gc

    collecting = gc.isenabled()
    quick = args.command not in _LONG_RUNNING
    # `run` as the process: the collector is off while it starts too (its passes over the
    # hundreds of thousands of objects that importing py-libp2p, SQLAlchemy and aiohttp
    # creates cost a sixth of an `autotls run --once`, bench/peers.py) and back on, with
    # start-up's objects frozen out of its way, once the node is up (run.py calls
    # args.on_started). In process (tests, embedders) the collector is left alone.
    settling = args.command == "run" and process_ends and collecting
    args.on_started = _settle_collector if settling else _nothing
    if quick or settling:
        gc.disable()
    try:
        return _run_command(args)
    finally:
        if process_ends:
            # Python's exit runs full collections over every object still alive (hundreds
            # of thousands once SQLAlchemy or py-libp2p is loaded) only to free memory that
            # the process gives back a moment later anyway; frozen objects are skipped. That
            # is a sixth of `autotls status` (bench/cli.py) and a quarter of a second of
            # `autotls run --once` (bench/peers.py). atexit handlers still run.
            gc.freeze()
        if collecting:
            gc.enable()


def _settle_collector() -> None:
    """The node is running: what start-up created (modules, classes, settings) lives as long
    as the process, so the collector need not look at it again; then it is back on."""
    import gc

    gc.freeze()
    gc.enable()


def _nothing() -> None:
    pass


def _run_command(args: argparse.Namespace) -> int:
    import asyncio
    import traceback
    import warnings

    from autotls.cli.exits import EXIT_INTERRUPTED, exit_code_for, scrub
    from autotls.cli.logs import stderr_logging
    from autotls.cli.settings import log_format, secret_values

    try:
        chosen_format = log_format(args)
    except UsageError as exc:
        err(f"{PROG}: error: {one_line(str(exc))}")
        return EXIT_USAGE
    secrets = secret_values(args)
    with stderr_logging(args.verbose, chosen_format), warnings.catch_warnings():
        if not args.verbose:
            # The system CA bundle holds a root with a negative serial; cryptography warns
            # about it on every load, which tells an operator nothing they can act on.
            from cryptography.utils import CryptographyDeprecationWarning

            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            return asyncio.run(_dispatch(args))
        except (KeyboardInterrupt, asyncio.CancelledError):
            err(f"{PROG}: interrupted", level="error")
            return EXIT_INTERRUPTED
        except Exception as exc:
            code, message = exit_code_for(exc)
            detail = None
            if args.verbose:
                detail = scrub("".join(traceback.format_exception(exc)).rstrip(), secrets)
            line = scrub(one_line(message), secrets)
            if chosen_format == "json":
                err(line, level="error", exit_code=code, exc=detail)
            else:
                if detail is not None:
                    err(detail)
                err(f"{PROG}: error: {line}")
            return code
