"""mypy holds the engine and the embedder to the declarations (issue 9 §1 and §3).

``mypy --strict`` runs once on a small module that uses the order's data the way the steps do
and the facade the way an embedder does: the correct lines pass, and each line marked ``BAD``
is refused on that line, and only those. Reading order data with ``.get()`` is the one use
mypy cannot check (PEP 589 lets it take any key), which is why
:func:`~autotls.fsm.data.order_data` returns every key and the engine indexes it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USES = """
from datetime import datetime

from autotls import AutoTLS, CertificateInfo, Failure, OrderEvent
from autotls.fsm.data import ORDER_KEYS, OrderData, order_data
from autotls.fsm.machine import Trigger
from autotls.fsm.outcomes import Advance, Wait


def good(raw: dict[str, object], now: datetime, auto: AutoTLS) -> str | None:
    data = order_data(raw)
    Wait(now, "waiting", updates={"txt_resends": 1})
    Advance(Trigger.REORDER, clear=ORDER_KEYS, updates={"replaces": None})

    def loaded(cert: CertificateInfo) -> None: ...

    def failed(failure: Failure) -> None: ...

    def moved(event: OrderEvent) -> None: ...

    auto.on("loaded", loaded)
    auto.on("renewed", lambda cert: print(cert.serial))
    auto.on("failed", failed)
    auto.on("transition", moved)
    return data["order_url"]


def typos(raw: dict[str, object], now: datetime, auto: AutoTLS) -> None:
    data = order_data(raw)
    data["ordr_url"]  # BAD read
    Wait(now, "waiting", updates={"txt_resend": 1})  # BAD write
    Advance(Trigger.TXT_TIMEOUT, updates={"txt_resends": "one"})  # BAD value
    Advance(Trigger.TXT_TIMOUT)  # BAD trigger
    x: OrderData = {"chain_pem": 3}  # BAD value

    def failed(failure: Failure) -> None: ...

    auto.on("loaded", failed)  # BAD payload
    auto.on("renewed", lambda cert: print(cert.message))  # BAD attribute
    auto.on("loadde", failed)  # BAD event
"""


def test_mypy_refuses_misspelt_keys_wrong_values_and_wrong_event_payloads(tmp_path: Path) -> None:
    module = tmp_path / "uses_autotls.py"
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
        timeout=600,
        check=False,
    )
    bad = {n for n, line in enumerate(USES.splitlines(), start=1) if "# BAD" in line}
    flagged: dict[int, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(rf"{re.escape(str(module))}:(\d+): error: (.*)", line)
        if match:
            flagged.setdefault(int(match.group(1)), match.group(2))
    assert set(flagged) == bad, result.stdout + result.stderr
    said = " ".join(flagged.values())
    assert 'has no key "ordr_url"' in said and 'Extra key "txt_resend"' in said
