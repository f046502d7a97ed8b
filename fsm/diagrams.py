"""State diagrams rendered from the one declaration in :mod:`autotls.fsm.machine`.

* :func:`mermaid` -- the machine as a Mermaid ``stateDiagram-v2`` (committed as
  ``diagrams/order-machine.mmd`` and embedded in the README; code hosts render it).
* :func:`dot` / :func:`svg` -- the same graph for Graphviz, when ``dot`` is installed.
* ``path=`` -- one order's walk, read from its journal: visited states and taken edges are
  highlighted and numbered, the current state is marked.

Every declared transition is drawn: one edge per source state, ``[*]`` for the creating move,
recoveries (``Transition.recovery``) dashed in the SVG. A move that stays in *every* active
state (``retry_later``) is drawn once, as a note, rather than as a loop on each state.

A test regenerates the committed files and fails when they drift from the code:
``python -m autotls.fsm.diagrams`` rewrites them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from autotls.fsm.machine import ACTIVE_STATES, TRANSITIONS, State, Transition

DIAGRAM_DIR = Path(__file__).resolve().parent.parent / "diagrams"
MERMAID_FILE = "order-machine.mmd"
SVG_FILE = "order-machine.svg"

Move = tuple[str | None, str, str]  # (from, to, trigger) as in autotls.fsm.journal.moves
Edge = tuple[str | None, str, str, bool]  # (from or None for [*], to, trigger, recovery)


def _everywhere(t: Transition) -> bool:
    """A move that stays in whichever active state the order is in."""
    return t.dest is None and set(t.sources) == set(ACTIVE_STATES)


def _edges() -> list[Edge]:
    return [
        (None if src is None else src.value, dst.value, t.trigger.value, t.recovery)
        for t in TRANSITIONS
        if not _everywhere(t)
        for src, dst in t.edges()
    ]


def _notes() -> list[Transition]:
    return [t for t in TRANSITIONS if _everywhere(t)]


def _taken(path: Sequence[Move]) -> dict[tuple[str | None, str, str], list[int]]:
    taken: dict[tuple[str | None, str, str], list[int]] = {}
    for number, (src, dst, trigger) in enumerate(path):
        taken.setdefault((src, dst, trigger), []).append(number)
    return taken


def mermaid(path: Sequence[Move] | None = None, *, title: str | None = None) -> str:
    lines = []
    if title:
        lines += ["---", f"title: {title}", "---"]
    lines += ["stateDiagram-v2"]
    taken = _taken(path or [])
    for src, dst, trigger, _recovery in _edges():
        label = trigger
        steps = taken.get((src, dst, trigger))
        if steps:
            label = f"{trigger} #" + ",#".join(str(n) for n in steps)
        lines.append(f"    {src or '[*]'} --> {dst}: {label}")
    for t in _notes():
        lines.append(f"    note right of {State.NEW.value}: {t.trigger.value} ({_note(t)})")
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
    for t in _notes():
        out.append(
            f'  note_{t.trigger.value} [shape=note, style=filled, fillcolor="#f4f4f4", '
            f"label=<{t.trigger.value}<br/>{_note(t)}>];"
        )
    for state in State:
        fill = "white"
        if state.value == current:
            fill = "#ffd27f"
        elif state.value in visited:
            fill = "#d8f0d8"
        out.append(f'  {state.value} [fillcolor="{fill}"];')
    for src, dst, trigger, recovery in _edges():
        steps = taken.get((src, dst, trigger))
        tail = src or "start"
        if steps:
            numbers = ",".join(f"#{n}" for n in steps)
            out.append(
                f'  {tail} -> {dst} [label="{trigger} {numbers}", color="#2a7a2a", penwidth=2.5];'
            )
        elif recovery:
            out.append(
                f'  {tail} -> {dst} [label="{trigger}", color="#999999", style=dashed, weight=0];'
            )
        else:
            out.append(f'  {tail} -> {dst} [label="{trigger}", penwidth=1.5, weight=4];')
    out.append("}")
    return "\n".join(out) + "\n"


def _note(t: Transition) -> str:
    return f"any active state, {t.doc}"


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
