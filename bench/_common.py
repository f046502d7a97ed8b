"""What every benchmark shares: percentiles, the printed table, ``--json``, the machine line,
and throw-away PostgreSQL databases.

Benchmarks print figures; they never assert on time (design.md, ``bench/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PG_SERVER_ENV = ("AUTOTLS_BENCH_PG", "AUTOTLS_TEST_PG")
PG_DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


@dataclass
class Report:
    """One benchmark's figures: printed as a table, or as JSON with ``--json``."""

    title: str
    columns: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "machine": machine(),
            "params": self.params,
            "rows": self.rows,
            "notes": self.notes,
        }

    def render(self) -> str:
        cells = [[_cell(row.get(c)) for c in self.columns] for row in self.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(self.columns)]
        m = machine()
        lines = [
            f"== {self.title} ==",
            f"{m['date']}, {m['cpus']} cpus, Python {m['python']}, {m['platform']}",
        ]
        if self.params:
            lines.append("params: " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        lines.append("  ".join(c.rjust(w) for c, w in zip(self.columns, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        for r in cells:
            lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def emit(reports: Sequence[Report], as_json: bool) -> None:
    if as_json:
        json.dump([r.as_json() for r in reports], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n\n".join(r.render() for r in reports))
    sys.stdout.flush()


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def pg_server() -> str:
    for name in PG_SERVER_ENV:
        if os.environ.get(name):
            return os.environ[name].rstrip("/")
    return PG_DEFAULT_SERVER


def pg_unavailable_reason() -> str | None:
    """Why PostgreSQL cannot be used (None when it can)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (the postgres extra)"
    try:
        with psycopg.connect(f"{pg_server()}/postgres", connect_timeout=5):
            return None
    except psycopg.OperationalError as exc:
        return f"PostgreSQL at {pg_server()} unreachable: {str(exc).strip()}"


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh database on the benchmark server, dropped afterwards; yields its URL."""
    import psycopg

    name = f"autotls_bench_{uuid.uuid4().hex[:12]}"
    admin = f"{pg_server()}/postgres"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_server()}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def temporary_database(backend: str) -> Iterator[str]:
    """A throw-away database's URL: a fresh PostgreSQL database (:func:`pg_database`), or a
    SQLite file in a temporary directory; gone afterwards."""
    if backend == "postgresql":
        with pg_database() as url:
            yield url
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="autotls-bench-") as tmp:
            yield f"sqlite:///{tmp}/bench.db"
