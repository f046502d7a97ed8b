"""``examples/aiohttp_wss.py`` keeps working: its main coroutine runs against the local stack
(started by the example itself, ``--local-stack``), and an aiohttp WebSocket client connects
over TLS with SNI ``<ip-label>.<peer>.libp2p.direct``, verified with Pebble's roots only, and
exchanges a message with it."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import ssl
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest

from autotls.localstack.pebble import pebble_available
from tests.fixtures.components import component_missing

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "aiohttp_wss.py"
DEADLINE_S = 60.0


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiohttp_wss_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
async def test_secure_websocket_from_the_issued_certificate(
    libp2p_installed: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not pebble_available():
        component_missing("pebble (the pebble and pebble-challtestsrv binaries)")
    example = load_example()
    options = example.parse_options(["--local-stack", "--data-dir", str(tmp_path / "example")])
    serving: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="aiohttp_wss")

    async def ready(info: object) -> None:
        serving.set_result(info)

    task = asyncio.create_task(example.serve(options, ready=ready, stop=stop))
    try:
        done, _ = await asyncio.wait(
            {task, serving}, timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()  # raises what went wrong
        assert serving in done, "the example did not serve a certificate in time"
        info = serving.result()
        peer = info.auto.peer_id
        assert info.server_name == f"127-0-0-1.{peer}.libp2p.direct"
        assert any(
            a.startswith(f"/dns4/127-0-0-1.{peer}.libp2p.direct/") for a in info.forge_addresses
        )

        client_context = ssl.create_default_context(cadata="".join(info.trust_roots_pem))
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"wss://{info.host}:{info.port}/ws",
                ssl=client_context,
                server_hostname=info.server_name,
                timeout=aiohttp.ClientWSTimeout(ws_close=10),
            ) as ws:
                await ws.send_str("hello over AutoTLS")
                reply = await ws.receive(timeout=10)
                assert reply.type == aiohttp.WSMsgType.TEXT
                assert reply.data == "hello over AutoTLS"
                peer_cert = ws.get_extra_info("peercert")
                assert peer_cert is not None
                sans = [v for k, v in peer_cert["subjectAltName"] if k == "DNS"]
                assert sans == [f"*.{peer}.libp2p.direct"]

            # the same certificate does not verify for another name: verification is real
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.ws_connect(
                    f"wss://{info.host}:{info.port}/ws",
                    ssl=client_context,
                    server_hostname="127-0-0-1.someone-else.libp2p.direct",
                )
        assert any("certificate loaded" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)


def test_refuses_to_announce_an_unspecified_address(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example()
    assert example.main(["--host", "0.0.0.0"]) == 2
    assert "give --public-ip" in capsys.readouterr().err


def test_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--local-stack" in result.stdout and "--public-ip" in result.stdout
