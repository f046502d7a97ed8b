"""State diagrams rendered from the one declaration in :mod:`autotls.fsm.machine`.

* :func:`mermaid` -- the machine as a Mermaid ``stateDiagram-v2`` (committed as
  ``diagrams/order-machine.mmd`` and embedded in the README; code hosts render it).
* :func:`dot` / :func:`svg` -- the same graph for Graphviz, when ``dot`` is installed.
* ``path=`` -- one order's walk, read from its journal: visited states and taken edges are
  highlighted and numbered, the current state is marked.

A test regenerates the committed files and fails when they drift from the code:
``python -m autotls.fsm.diagrams`` rewrites them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from autotls.fsm.machine import TRANSITIONS, State

DIAGRAM_DIR = Path(__file__).resolve().parent.parent / "diagrams"
MERMAID_FILE = "order-machine.mmd"
SVG_FILE = "order-machine.svg"

Move = tuple[str | None, str, str]  # (from, to, trigger) as in autotls.fsm.journal.moves
# Edges that recover from trouble, drawn dashed so the issuance line reads at a glance.
RECOVERY_TRIGGERS = frozenset(
    {"fail", "account_lost", "reorder", "txt_timeout", "retry", "retry_install"}
)


def _edges() -> list[tuple[str, str, str]]:
    edges: list[tuple[str, str, str]] = []
    for t in TRANSITIONS:
        for src in t.sources:
            edges.append((src.value, t.dest.value, t.trigger))
    return edges


def _taken(path: Sequence[Move]) -> dict[tuple[str, str, str], list[int]]:
    taken: dict[tuple[str, str, str], list[int]] = {}
    for number, (src, dst, trigger) in enumerate(path, start=1):
        if src is None:
            continue
        taken.setdefault((src, dst, trigger), []).append(number - 1)
    return taken


def mermaid(path: Sequence[Move] | None = None, *, title: str | None = None) -> str:
    lines = []
    if title:
        lines += ["---", f"title: {title}", "---"]
    lines += ["stateDiagram-v2", f"    [*] --> {State.NEW.value}"]
    taken = _taken(path or [])
    for src, dst, trigger in _edges():
        label = trigger
        steps = taken.get((src, dst, trigger))
        if steps:
            label = f"{trigger} #" + ",#".join(str(n) for n in steps)
        lines.append(f"    {src} --> {dst}: {label}")
    if path:
        visited = {dst for _, dst, _ in path}
        current = path[-1][1]
        lines.append("    classDef visited fill:#d8f0d8,stroke:#2a7a2a")
        lines.append("    classDef current fill:#ffd27f,stroke:#b36b00,stroke-width:3px")
        others = sorted(s for s in visited if s != current)
        if others:
            lines.append(f"    class {','.join(others)} visited")
        lines.append(f"    class {current} current")
    return "\n".join(lines) + "\n"


def dot(path: Sequence[Move] | None = None, *, title: str | None = None) -> str:
    taken = _taken(path or [])
    visited = {dst for _, dst, _ in path or []}
    current = path[-1][1] if path else None
    out = [
        "digraph order_machine {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    if title:
        out.append(f'  label="{title}"; labelloc=t;')
    out.append('  start [shape=point, label=""];')
    out.append(f"  start -> {State.NEW.value};")
    for state in State:
        fill = "white"
        if state.value == current:
            fill = "#ffd27f"
        elif state.value in visited:
            fill = "#d8f0d8"
        out.append(f'  {state.value} [fillcolor="{fill}"];')
    for src, dst, trigger in _edges():
        steps = taken.get((src, dst, trigger))
        if steps:
            numbers = ",".join(f"#{n}" for n in steps)
            out.append(
                f'  {src} -> {dst} [label="{trigger} {numbers}", color="#2a7a2a", penwidth=2.5];'
            )
        elif trigger in RECOVERY_TRIGGERS:
            out.append(
                f'  {src} -> {dst} [label="{trigger}", color="#999999", style=dashed, weight=0];'
            )
        else:
            out.append(f'  {src} -> {dst} [label="{trigger}", penwidth=1.5, weight=4];')
    out.append("}")
    return "\n".join(out) + "\n"


def graphviz_available() -> bool:
    return shutil.which("dot") is not None


def svg(path: Sequence[Move] | None = None, *, title: str | None = None) -> str:
    executable = shutil.which("dot")
    if executable is None:
        raise RuntimeError("Graphviz `dot` is not installed: use the Mermaid format instead")
    result = subprocess.run(  # noqa: S603 - fixed executable, our own input
        [executable, "-Tsvg"],
        input=dot(path, title=title).encode(),
        capture_output=True,
        check=True,
        timeout=30,
    )
    return result.stdout.decode()


def write(directory: Path = DIAGRAM_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / MERMAID_FILE]
    written[0].write_text(mermaid())
    if graphviz_available():
        (directory / SVG_FILE).write_text(svg())
        written.append(directory / SVG_FILE)
    return written


if __name__ == "__main__":
    for file in write(Path(sys.argv[1]) if len(sys.argv) > 1 else DIAGRAM_DIR):
        print(file)
