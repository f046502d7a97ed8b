"""The CA's directory cached in the data directory (issue 11: a known account sends no
directory GET), and a stale cache fetched anew, once, when the CA says an endpoint is gone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autotls.adapters import AcmeAdapter
from autotls.fsm.clock import ManualClock
from autotls.fsm.ports import AcmeAccount
from autotls.http import Exchange
from tests.fakes.acme_server import FakeAcmeServer


@pytest.fixture
async def ca() -> AsyncIterator[FakeAcmeServer]:
    async with FakeAcmeServer(now=ManualClock().now) as server:
        yield server


async def place_order(ca: FakeAcmeServer, cache: Path, key: bytes | None = None) -> list[str]:
    """Register (or find) the account of ``key`` and place an order; the request classes."""
    seen: list[Exchange] = []
    acme = AcmeAdapter(ca.directory_url, directory_cache=cache, observer=seen.append)
    try:
        key = key or acme.generate_account_key()
        registered = await acme.register_account(AcmeAccount(key, None))
        await acme.new_order(
            AcmeAccount(key, registered.url),
            "*.k51example.libp2p.direct",
            profile=None,
            replaces=None,
        )
    finally:
        await acme.close()
    return [e.request_class for e in seen]


async def test_the_directory_is_fetched_once_then_read_from_the_cache(
    ca: FakeAcmeServer, tmp_path: Path
) -> None:
    cache = tmp_path / "acme-directory.json"
    assert (await place_order(ca, cache))[0] == "directory"
    stored = json.loads(cache.read_text())
    assert stored["url"] == ca.directory_url and "newOrder" in stored["directory"]
    assert "directory" not in await place_order(ca, cache)
    assert ca.count("directory") == 1


async def test_a_cache_of_another_ca_is_not_used(ca: FakeAcmeServer, tmp_path: Path) -> None:
    cache = tmp_path / "acme-directory.json"
    cache.write_text(json.dumps({"url": "https://other.test/dir", "directory": {}}))
    assert (await place_order(ca, cache))[0] == "directory"
    assert json.loads(cache.read_text())["url"] == ca.directory_url


async def test_a_stale_cache_is_fetched_anew_once(ca: FakeAcmeServer, tmp_path: Path) -> None:
    cache = tmp_path / "acme-directory.json"
    await place_order(ca, cache)
    stored = json.loads(cache.read_text())
    # The CA moved its endpoints since: every URL in the cache answers 404 now.
    moved = {k: v + "-moved" if isinstance(v, str) else v for k, v in stored["directory"].items()}
    cache.write_text(json.dumps({"url": ca.directory_url, "directory": moved}))
    classes = await place_order(ca, cache)
    assert classes.count("directory") == 1
    assert classes[:3] == ["newNonce", "directory", "newNonce"], classes
    assert "newOrder" in classes
    assert json.loads(cache.read_text())["directory"] == stored["directory"]


async def test_an_unreadable_cache_is_ignored(ca: FakeAcmeServer, tmp_path: Path) -> None:
    cache = tmp_path / "acme-directory.json"
    cache.write_text("{not json")
    assert (await place_order(ca, cache))[0] == "directory"
    assert json.loads(cache.read_text())["url"] == ca.directory_url
