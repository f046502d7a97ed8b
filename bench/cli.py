"""Start-up cost of the command line: how long ``autotls --help``, ``status``, ``diagram``,
``db current`` and ``account show`` take as whole processes, next to ``python -c pass``.

Each command is started ``--runs`` times (after one warm-up run that is not counted), the
commands taking turns (A B C A B C ...) so that a machine whose speed drifts slows them all
alike. Per command: median, min and max wall milliseconds (a monotonic clock read around
spawn and reap), median CPU milliseconds (user + system, the kernel's accounting of the
finished child) and the median peak RSS; the issue's targets are printed beside them.

The database commands read the demo's database (``--data-dir``, default ``.autotls-demo``,
which ``./scripts/demo`` makes). When there is none, the benchmark runs ``autotls demo`` once
to make one (that needs Pebble on PATH).

``python -m bench.cli [--runs 10] [--data-dir DIR] [--autotls PATH] [--json]``

``--autotls`` measures another installation (e.g. an older checkout's ``.venv/bin/autotls``);
``python -c pass`` then runs with that installation's Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import Report, add_json_flag, emit

# Issue 11 §1: the targets, in milliseconds of wall time.
TARGETS_MS = {"--help": 150.0, "status": 300.0}


@dataclass
class Command:
    label: str
    argv: list[str]
    target_ms: float | None = None
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)


# Runs one command and reports on it. It forks the command itself because a child's peak RSS
# starts at whatever its parent occupied when it forked: from this benchmark's process (15 MiB
# and more) that floor would hide the difference between `python -c pass` and `--help`; from
# this small interpreter (python -I -S) it is ~8 MiB, below anything measured here.
_SPAWNER = """
import os, sys, time
argv = sys.argv[1:]
null = os.open(os.devnull, os.O_RDWR)
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
cpu = usage.ru_utime + usage.ru_stime
print(os.waitstatus_to_exitcode(status), wall * 1000, cpu * 1000, usage.ru_maxrss)
"""


def run_once(argv: Sequence[str]) -> tuple[int, float, float, int]:
    """Run ``argv`` with its output thrown away: (exit code, wall ms, CPU ms, peak RSS KiB).
    Wall time is read around fork and reap; CPU and RSS are the kernel's accounting of the
    finished process (``wait4``; RSS in KiB on Linux)."""
    spawner = [sys.executable, "-I", "-S", "-c", _SPAWNER, *argv]
    line = subprocess.run(spawner, capture_output=True, text=True, check=True).stdout.split()
    return int(line[0]), float(line[1]), float(line[2]), int(line[3])


def _ensure_database(autotls: Path, data_dir: Path) -> None:
    if (data_dir / "autotls.db").is_file():
        return
    print(f"no database in {data_dir}: making one with `autotls demo`", file=sys.stderr)
    result = subprocess.run(
        [str(autotls), "demo", "--workdir", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not (data_dir / "autotls.db").is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"autotls demo failed ({result.returncode}): {' '.join(tail)}")


def commands(autotls: Path, python: Path, data_dir: Path) -> list[Command]:
    db = ["--data-dir", str(data_dir)]
    exe = str(autotls)
    return [
        Command("python -c pass", [str(python), "-c", "pass"]),
        Command("autotls --help", [exe, "--help"], TARGETS_MS["--help"]),
        Command("autotls status", [exe, "status", *db], TARGETS_MS["status"]),
        Command("autotls diagram", [exe, "diagram", *db]),
        Command("autotls db current", [exe, "db", "current", *db]),
        Command("autotls account show", [exe, "account", "show", *db]),
    ]


def measure(cmds: Sequence[Command], runs: int) -> None:
    for cmd in cmds:  # warm-up: page cache, .pyc files
        code, *_ = run_once(cmd.argv)
        if code != 0:
            out = subprocess.run(cmd.argv, capture_output=True, text=True, check=False)
            raise SystemExit(f"{cmd.label} exited {code}: {out.stderr.strip()[-500:]}")
    for _ in range(runs):
        for cmd in cmds:
            code, wall, cpu, rss = run_once(cmd.argv)
            if code != 0:
                raise SystemExit(f"{cmd.label} exited {code} during the runs")
            cmd.wall_ms.append(wall)
            cmd.cpu_ms.append(cpu)
            cmd.rss_kib.append(rss)


def report(
    cmds: Sequence[Command], runs: int, autotls: Path, data_dir: Path, floor_kib: int
) -> Report:
    rep = Report(
        "cli: whole-process start-up of quick commands",
        [
            "command",
            "wall p50 ms",
            "min",
            "max",
            "cpu p50 ms",
            "peak RSS MiB",
            "target ms",
            "meets",
        ],
        params={"runs": runs, "autotls": str(autotls), "data_dir": str(data_dir)},
    )
    for cmd in cmds:
        wall = statistics.median(cmd.wall_ms)
        rep.add(
            command=cmd.label,
            min=min(cmd.wall_ms),
            max=max(cmd.wall_ms),
            meets=None if cmd.target_ms is None else ("yes" if wall <= cmd.target_ms else "no"),
            **{
                "wall p50 ms": wall,
                "cpu p50 ms": statistics.median(cmd.cpu_ms),
                "peak RSS MiB": statistics.median(cmd.rss_kib) / 1024,
                "target ms": cmd.target_ms,
            },
        )
    rep.notes.append(
        "targets (issue 11): --help <= 150 ms, status on the demo's database <= 300 ms"
    )
    rep.notes.append("wall includes waiting for a core: on a busy machine compare cpu p50 too")
    rep.notes.append(f"peak RSS cannot read below the spawner's own: {floor_kib / 1024:.2f} MiB")
    return rep


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cli", description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="counted runs per command")
    parser.add_argument("--data-dir", type=Path, default=Path(".autotls-demo"))
    parser.add_argument(
        "--autotls",
        type=Path,
        default=Path(sys.executable).parent / "autotls",
        help="the autotls script to measure (default: this virtualenv's)",
    )
    add_json_flag(parser)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be positive")
    autotls: Path = args.autotls.absolute()
    if not os.access(autotls, os.X_OK):
        parser.error(f"{autotls} is not an executable autotls script")
    python = autotls.parent / "python"
    if not os.access(python, os.X_OK):
        python = Path(sys.executable)
    data_dir: Path = args.data_dir.absolute()
    _ensure_database(autotls, data_dir)
    cmds = commands(autotls, python, data_dir)
    measure(cmds, args.runs)
    floor_kib = run_once(["/bin/true"])[3]
    emit([report(cmds, args.runs, autotls, data_dir, floor_kib)], args.json)


if __name__ == "__main__":
    main()
