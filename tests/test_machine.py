"""The declaration: its shape, its guards, and the diagrams rendered from it."""

from __future__ import annotations

import re

import pytest

from autotls.fsm import diagrams
from autotls.fsm.machine import (
    ACTIVE_STATES,
    STATE_REQUIRES,
    TRANSITIONS,
    InvalidTransitionError,
    State,
    destination,
    fire,
    is_valid_path,
    requirements,
    triggers_from,
)
from autotls.persistence.models import INACTIVE_STATES

FULL = {key: "x" for state in State for key in requirements(state)}
FULL["installed_at"] = "x"


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
        assert destination(state, "fail") is State.FAILED


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
        state = fire(state, trigger, FULL)
        assert state is expected


def test_fire_refuses_undeclared_moves_with_a_clear_message() -> None:
    with pytest.raises(
        InvalidTransitionError, match="'certificate_issued' is not allowed from New"
    ):
        fire(State.NEW, "certificate_issued", FULL)
    with pytest.raises(InvalidTransitionError, match="unknown trigger 'teleport'"):
        fire(State.NEW, "teleport", FULL)
    with pytest.raises(InvalidTransitionError, match="unknown state 'Limbo'"):
        fire("Limbo", "fail", FULL)
    with pytest.raises(InvalidTransitionError, match="'fail' is not allowed from Failed"):
        fire(State.FAILED, "fail", FULL)


@pytest.mark.parametrize("state", sorted(STATE_REQUIRES, key=list(State).index))
def test_guards_require_the_data_each_state_implies(state: State) -> None:
    transition = next(t for t in TRANSITIONS if t.dest is state)
    source = transition.sources[0]
    missing = dict(FULL)
    key = STATE_REQUIRES[state][0]
    del missing[key]
    with pytest.raises(InvalidTransitionError, match=f"lacks data: .*{key}"):
        fire(source, transition.trigger, missing)
    assert fire(source, transition.trigger, FULL) is state


def test_fire_leaves_no_models_behind() -> None:
    from autotls.fsm import machine

    for _ in range(100):
        fire(State.NEW, "account_ready", FULL)
    assert machine._MACHINE.models == []


def test_path_validation() -> None:
    good = [(None, "New", "create"), ("New", "Registered", "account_ready")]
    assert is_valid_path(good)
    assert not is_valid_path([("New", "Registered", "account_ready")])
    assert not is_valid_path([*good, ("New", "Registered", "account_ready")])
    assert not is_valid_path([*good, ("Registered", "Installed", "order_placed")])


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
        assert f">{t.trigger}<" in svg


def test_mermaid_covers_every_edge_once() -> None:
    text = diagrams.mermaid()
    edges = re.findall(r"^    (\w+) --> (\w+): (\w+)$", text, flags=re.M)
    expected = {(s.value, t.dest.value, t.trigger) for t in TRANSITIONS for s in t.sources}
    assert set(edges) == expected and len(edges) == len(expected)


def test_order_path_highlights_taken_edges_and_the_current_state() -> None:
    path = [
        (None, "New", "create"),
        ("New", "Registered", "account_ready"),
        ("Registered", "Challenged", "order_placed"),
    ]
    text = diagrams.mermaid(path, title="order 7")
    assert "title: order 7" in text
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
    from autotls.persistence.records import OrderSnapshot

    now = datetime(2026, 1, 1, tzinfo=UTC)
    snap = OrderSnapshot(
        id=1,
        peer_id="k51x",
        identifier="*.k51x.libp2p.direct",
        state="Installed",
        data=FULL,
        fence=1,
        attempts=0,
        next_run_at=now,
        account=None,
        cert_key_pem=None,
        certificate=None,
        last_error_class=None,
        last_error_message=None,
        lease_owner="w",
        lease_until=now,
        created_at=now,
        updated_at=now,
    )
    with pytest.raises(InvalidTransitionError, match="operator's move"):
        plan_outcome(snap, Advance("force_renewal"), now)
    assert plan_outcome(snap, Advance("renewal_due"), now).to_state == State.RENEW_DUE.value
