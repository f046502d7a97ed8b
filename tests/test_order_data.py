"""The order's data is declared once (autotls/fsm/data.py); what is derived from it.

That mypy refuses a misspelt key is checked in tests/test_typing.py.
"""

from __future__ import annotations

from autotls.fsm.data import ALL_KEYS, ORDER_KEYS, WAIT_KEYS, order_data, renewal_plan


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
