"""The order's data is declared once (autotls/fsm/data.py), and mypy holds the engine to it.

``mypy --strict`` runs on a small module that uses the data the way the steps do: the correct
lines pass, and each misspelt key or wrongly typed value is refused on its own line. Reading
with ``.get()`` is the one use mypy cannot check (PEP 589 lets it take any key), which is why
:func:`~autotls.fsm.data.order_data` returns every key and the engine indexes it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from autotls.fsm.data import ALL_KEYS, ORDER_KEYS, WAIT_KEYS, order_data, renewal_plan

ROOT = Path(__file__).resolve().parent.parent

USES = '''
from datetime import datetime

from autotls.fsm.data import ORDER_KEYS, OrderData, order_data
from autotls.fsm.machine import Trigger
from autotls.fsm.outcomes import Advance, Wait


def good(raw: dict[str, object], now: datetime) -> str | None:
    data = order_data(raw)
    Wait(now, "waiting", updates={"txt_resends": 1})
    Advance(Trigger.REORDER, clear=ORDER_KEYS, updates={"replaces": None})
    return data["order_url"]


def typos(raw: dict[str, object], now: datetime) -> None:
    data = order_data(raw)
    data["ordr_url"]  # BAD read
    Wait(now, "waiting", updates={"txt_resend": 1})  # BAD write
    Advance(Trigger.TXT_TIMEOUT, updates={"txt_resends": "one"})  # BAD value
    Advance(Trigger.TXT_TIMOUT)  # BAD trigger
    x: OrderData = {"chain_pem": 3}  # BAD value
'''


def test_mypy_refuses_misspelt_keys_and_wrong_values(tmp_path: Path) -> None:
    module = tmp_path / "uses_order_data.py"
    module.write_text(USES)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(module),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = USES.splitlines()
    bad = {n for n, line in enumerate(lines, start=1) if "# BAD" in line}
    flagged: dict[int, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(rf"{re.escape(str(module))}:(\d+): error: (.*)", line)
        if match:
            flagged.setdefault(int(match.group(1)), match.group(2))
    assert set(flagged) == bad, result.stdout + result.stderr
    assert "has no key \"ordr_url\"" in " ".join(flagged.values())
    assert "Extra key \"txt_resend\"" in " ".join(flagged.values())


def test_reads_see_every_declared_key_and_keep_what_the_row_holds() -> None:
    raw = {"order_url": "https://ca.test/order/1", "legacy": 1}
    data = order_data(raw)
    assert set(data) == ALL_KEYS | {"legacy"}
    assert data["order_url"] == "https://ca.test/order/1" and data["dns_value"] is None
    assert renewal_plan(None)["ari_time"] is None
    assert renewal_plan({"ari_time": "t"})["ari_time"] == "t"


def test_the_derived_key_groups() -> None:
    assert "order_url" in ORDER_KEYS and "chain_pem" in ORDER_KEYS
    assert "replaces" not in ORDER_KEYS and "renewal" not in ORDER_KEYS
    assert "validation_failures" not in ORDER_KEYS, "the budget outlives one ACME order"
    assert frozenset({"waiting_for"}) == WAIT_KEYS
