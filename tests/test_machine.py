"""The declaration: its shape, its guards, and the diagrams rendered from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from autotls.fsm import data, diagrams
from autotls.fsm.machine import (
    ACTIVE_STATES,
    STATE_CONTRIBUTIONS,
    STATE_REQUIRES,
    TRANSITIONS,
    InvalidTransitionError,
    Mover,
    State,
    Trigger,
    destination,
    fire,
    is_valid_path,
    requirements,
    triggers_from,
)
from autotls.persistence.models import INACTIVE_STATES

FULL = {key: "x" for state in State for key in requirements(state)}
FULL["installed_at"] = "x"
ROOT = Path(__file__).resolve().parent.parent
STEP = Mover.STEP


def test_persistence_agrees_on_the_inactive_states() -> None:
    assert set(INACTIVE_STATES) == {s.value for s in State if s not in ACTIVE_STATES}


def test_every_state_is_reachable_and_every_active_state_can_fail() -> None:
    reachable = {State.NEW}
    frontier = [State.NEW]
    while frontier:
        state = frontier.pop()
        for trigger in triggers_from(state):
            nxt = destination(state, trigger)
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(State)
    for state in ACTIVE_STATES:
        assert destination(state, Trigger.FAIL) is State.FAILED
        assert destination(state, Trigger.CORRUPT) is State.FAILED
        assert destination(state, Trigger.RETRY_LATER) is state


def test_every_trigger_is_declared_once_and_says_who_fires_it() -> None:
    assert [t.trigger for t in TRANSITIONS] == list(Trigger)
    assert all(t.by for t in TRANSITIONS)
    operator = {t.trigger for t in TRANSITIONS if Mover.OPERATOR in t.by}
    assert operator == {
        Trigger.CREATE,
        Trigger.FORCE_RENEWAL,
        Trigger.RETRY,
        Trigger.RETRY_INSTALL,
    }
    # Only the creating move comes from nowhere.
    assert [t.trigger for t in TRANSITIONS if not t.sources] == [Trigger.CREATE]


def test_what_each_state_requires_is_derived_from_the_data_declaration() -> None:
    assert set(STATE_REQUIRES[State.CHALLENGED]) == data.keys(
        data.OrderPlaced, data.AuthorizationFound
    )
    # A valid (reused) authorization brings no challenge: only BrokerNotified implies one.
    assert not set(STATE_REQUIRES[State.CHALLENGED]) & data.keys(data.ChallengeFound)
    assert data.keys(data.ChallengeFound) <= set(STATE_REQUIRES[State.BROKER_NOTIFIED])
    assert set(STATE_REQUIRES[State.INSTALLED]) == data.keys(data.CertificateInstalled)
    required = {key for keys in STATE_REQUIRES.values() for key in keys}
    assert required <= data.ALL_KEYS
    # The table in data.py's docstring names, before its "|", what the guards require.
    assert data.__doc__ is not None
    for state in State:
        row = re.search(rf"^{state.value} +(.*?)\|", data.__doc__, flags=re.M)
        assert row is not None, state
        named = re.findall(r"``(\w+)``", row.group(1))
        assert named == [c.__name__ for c in STATE_CONTRIBUTIONS.get(state, ())], state
    # What belongs to one ACME order, and what a wait wrote, are parts of the same declaration.
    assert data.ORDER_KEYS < data.ALL_KEYS and data.WAIT_KEYS < data.ALL_KEYS
    assert not data.ORDER_KEYS & data.keys(data.RenewalTarget, data.ValidationBudget)
    # Facts about a certificate live in its row, never in the order's data.
    assert not data.ALL_KEYS & {"serial", "not_after", "revoked_serial"}


def test_no_product_code_names_a_trigger_by_a_bare_string() -> None:
    """Triggers are symbols: a comparison, a ``trigger=`` argument or a call of the machine's
    functions with a literal trigger name outside machine.py would drift from the table."""
    values = {t.value for t in Trigger}
    calls = {"fire", "destination", "Advance", "JournalNote", "Trigger"}
    found = []
    for folder in ("autotls", "fsm", "persistence", "migrations"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "machine.py" or "/versions/" in str(path):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                literals: list[ast.expr] = []
                if isinstance(node, ast.Compare):
                    literals = [node.left, *node.comparators]
                elif isinstance(node, ast.keyword) and node.arg == "trigger":
                    literals = [node.value]
                elif isinstance(node, ast.Call):
                    name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                    if name in calls:
                        literals = list(node.args)
                for lit in literals:
                    if isinstance(lit, ast.Constant) and lit.value in values:
                        found.append(f"{path.relative_to(ROOT)}:{lit.lineno} {lit.value!r}")
    assert found == []


def test_the_happy_cycle_returns_to_ordering() -> None:
    path = [
        ("account_ready", State.REGISTERED),
        ("order_placed", State.CHALLENGED),
        ("broker_accepted", State.BROKER_NOTIFIED),
        ("txt_visible", State.DNS_PROPAGATED),
        ("authorization_valid", State.VALIDATED),
        ("certificate_issued", State.FINALIZED),
        ("certificate_installed", State.INSTALLED),
        ("renewal_due", State.RENEW_DUE),
        ("start_renewal", State.REGISTERED),
    ]
    state = State.NEW
    for trigger, expected in path:
        state = fire(state, trigger, FULL, by=STEP)
        assert state is expected


def test_fire_refuses_undeclared_moves_with_a_clear_message() -> None:
    with pytest.raises(
        InvalidTransitionError, match="'certificate_issued' is not allowed from New"
    ):
        fire(State.NEW, Trigger.CERTIFICATE_ISSUED, FULL, by=STEP)
    with pytest.raises(InvalidTransitionError, match="unknown trigger 'teleport'"):
        fire(State.NEW, "teleport", FULL, by=STEP)
    with pytest.raises(InvalidTransitionError, match="unknown state 'Limbo'"):
        fire("Limbo", Trigger.FAIL, FULL, by=Mover.POLICY)
    with pytest.raises(InvalidTransitionError, match="'fail' is not allowed from Failed"):
        fire(State.FAILED, Trigger.FAIL, FULL, by=Mover.POLICY)
    with pytest.raises(InvalidTransitionError, match="'retry' is a move of the operator"):
        fire(State.FAILED, Trigger.RETRY, FULL, by=STEP)
    with pytest.raises(InvalidTransitionError, match="'fail' is a move of the policy"):
        fire(State.NEW, Trigger.FAIL, FULL, by=Mover.OPERATOR)


def test_moves_that_stay_keep_the_state() -> None:
    assert fire(State.REGISTERED, Trigger.ABANDON_ORDER, {}, by=STEP) is State.REGISTERED
    assert fire(State.REGISTERED, Trigger.DROP_REPLACES, {}, by=STEP) is State.REGISTERED
    for state in ACTIVE_STATES:
        assert fire(state, Trigger.RETRY_LATER, {}, by=Mover.POLICY) is state
    with pytest.raises(InvalidTransitionError, match="not allowed from Challenged"):
        fire(State.CHALLENGED, Trigger.ABANDON_ORDER, {}, by=STEP)


@pytest.mark.parametrize("state", sorted(STATE_REQUIRES, key=list(State).index))
def test_guards_require_the_data_each_state_implies(state: State) -> None:
    transition = next(t for t in TRANSITIONS if t.dest is state)
    source = transition.sources[0]
    missing = dict(FULL)
    key = STATE_REQUIRES[state][0]
    del missing[key]
    by = next(iter(transition.by))
    with pytest.raises(InvalidTransitionError, match=f"lacks data: .*{key}"):
        fire(source, transition.trigger, missing, by=by)
    assert fire(source, transition.trigger, FULL, by=by) is state


def test_fire_leaves_no_models_behind() -> None:
    from autotls.fsm import machine

    for _ in range(100):
        fire(State.NEW, Trigger.ACCOUNT_READY, FULL, by=STEP)
    assert machine._MACHINE.models == []


def test_path_validation() -> None:
    good = [(None, "New", "create"), ("New", "Registered", "account_ready")]
    assert is_valid_path(good)
    assert not is_valid_path([("New", "Registered", "account_ready")])
    assert not is_valid_path([*good, ("New", "Registered", "account_ready")])
    assert not is_valid_path([*good, ("Registered", "Installed", "order_placed")])
    assert not is_valid_path([(None, "Registered", "create")])
    assert not is_valid_path([*good, ("Registered", "Registered", "teleport")])
    # Moves that stay, errors retried, a corrupt row set aside: all declared.
    assert is_valid_path(
        [
            *good,
            ("Registered", "Registered", "retry_later"),
            ("Registered", "Registered", "abandon_order"),
            ("Registered", "Registered", "drop_replaces"),
            ("Registered", "Failed", "corrupt"),
            ("Failed", "New", "retry"),
        ]
    )
    assert not is_valid_path([*good, ("Registered", "New", "retry_later")])


def test_committed_mermaid_matches_the_declaration() -> None:
    committed = (diagrams.DIAGRAM_DIR / diagrams.MERMAID_FILE).read_text()
    assert committed == diagrams.mermaid(), (
        "run `python -m autotls.fsm.diagrams` and commit the result"
    )


def test_committed_svg_shows_every_state_and_trigger() -> None:
    svg = (diagrams.DIAGRAM_DIR / diagrams.SVG_FILE).read_text()
    for state in State:
        assert f">{state.value}<" in svg
    for t in TRANSITIONS:
        assert f">{t.trigger.value}<" in svg


def test_mermaid_covers_every_edge_once() -> None:
    text = diagrams.mermaid()
    edges = re.findall(r"^    (\w+|\[\*\]) --> (\w+): (\w+)$", text, flags=re.M)
    noted = re.findall(r"^    note right of \w+: (\w+) \(any active state", text, flags=re.M)
    expected = {
        (src.value if src else "[*]", dst.value, t.trigger.value)
        for t in TRANSITIONS
        for src, dst in t.edges()
        if t.trigger.value not in noted
    }
    assert set(edges) == expected and len(edges) == len(expected)
    assert noted == [Trigger.RETRY_LATER.value]


def test_recoveries_are_a_property_of_the_table_and_the_svg_draws_them_dashed() -> None:
    recovery = {t.trigger for t in TRANSITIONS if t.recovery}
    assert Trigger.ABANDON_ORDER in recovery and Trigger.FAIL in recovery
    assert Trigger.CERTIFICATE_ISSUED not in recovery
    graph = diagrams.dot()
    for t in TRANSITIONS:
        for src, dst in t.edges():
            if t.trigger is Trigger.RETRY_LATER:
                continue
            line = next(
                ln
                for ln in graph.splitlines()
                if ln.startswith(f"  {src.value if src else 'start'} -> {dst.value} ")
                and f'label="{t.trigger.value}"' in ln
            )
            assert ("style=dashed" in line) is t.recovery, line


def test_order_path_highlights_taken_edges_and_the_current_state() -> None:
    path = [
        (None, "New", "create"),
        ("New", "Registered", "account_ready"),
        ("Registered", "Challenged", "order_placed"),
    ]
    text = diagrams.mermaid(path, title="order 7")
    assert "title: order 7" in text
    assert "[*] --> New: create #0" in text
    assert "New --> Registered: account_ready #1" in text
    assert "Registered --> Challenged: order_placed #2" in text
    assert "class Challenged current" in text
    assert "class New,Registered visited" in text
    graph = diagrams.dot(path)
    assert 'New -> Registered [label="account_ready #1", color="#2a7a2a"' in graph
    assert 'Challenged [fillcolor="#ffd27f"]' in graph


def test_svg_renders_when_graphviz_is_installed() -> None:
    if not diagrams.graphviz_available():
        from tests.fixtures.components import component_missing

        component_missing("graphviz `dot`")
    assert diagrams.svg().lstrip().startswith("<?xml")


def test_readme_diagram_matches_the_declaration() -> None:
    readme = (diagrams.DIAGRAM_DIR.parent / "README.md").read_text()
    block = readme.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert block == diagrams.mermaid(), (
        "paste `python -m autotls.fsm.diagrams` output into README.md"
    )


def test_a_step_cannot_fire_an_operators_trigger() -> None:
    from datetime import UTC, datetime

    from autotls.fsm.outcomes import Advance
    from autotls.fsm.policy import plan_outcome
    from tests.fixtures.engine import claimed_snapshot

    now = datetime(2026, 1, 1, tzinfo=UTC)
    snap = claimed_snapshot(State.INSTALLED, now, data=FULL, account=None)
    with pytest.raises(InvalidTransitionError, match="a move of the operator, not of the step"):
        plan_outcome(snap, Advance(Trigger.FORCE_RENEWAL), now)
    assert plan_outcome(snap, Advance(Trigger.RENEWAL_DUE), now).to_state == State.RENEW_DUE.value
