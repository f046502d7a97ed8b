"""Serve a secure WebSocket with aiohttp from an AutoTLS certificate.

::

    # everything on loopback: Pebble, challtestsrv and a local broker are started for you
    python examples/aiohttp_wss.py --local-stack

    # production (try --staging first): a public IPv4 address the broker can dial
    python examples/aiohttp_wss.py --public-ip 203.0.113.7 --data-dir /var/lib/echo

What it shows:

* ``AutoTLS.ssl_context`` handed to aiohttp's ``TCPSite``. The listener starts at once
  (serving a self-signed placeholder) and every new handshake gets the newest certificate,
  renewals included, without restarting the server.
* Why a libp2p node is needed at all: the broker proves that the requester owns the PeerID
  by dialing it back over libp2p, so the identity key must be reachable at a registered
  address. A py-libp2p node with plain TCP does that here; the WebSocket served by aiohttp is
  an application protocol (an echo), not a libp2p transport.
* The events: ``loaded``, ``renewed`` and ``failed`` are logged, and ``forge_addresses()``
  (the ``*.libp2p.direct`` addresses to announce) are printed with the ``wss://`` URL.

Browsers can connect to ``wss://<ip-label>.<peer>.libp2p.direct:<port>/ws`` once the forge
serves the name (production), because the certificate is a real Let's Encrypt one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from autotls import (
    LETS_ENCRYPT,
    LETS_ENCRYPT_STAGING,
    AutoTLS,
    CertificateInfo,
    Failure,
    Libp2pNode,
    LocalStack,
    Multiaddr,
    PrivateKey,
    ip_label,
    load_private_key,
    save_private_key,
)

log = logging.getLogger("aiohttp_wss")

MAX_MESSAGE = 64 * 1024
ISSUANCE_TIMEOUT_S = 600.0


@dataclass
class Options:
    data_dir: Path = Path(".aiohttp-wss-example")
    local_stack: bool = False
    host: str = "127.0.0.1"  # where the WebSocket and the libp2p node listen
    port: int = 0  # the secure WebSocket (0: any free port)
    p2p_port: int = 0  # the libp2p node the broker dials back
    public_ip: str | None = None  # the address to register; default: host
    staging: bool = False
    contact: list[str] = field(default_factory=list)
    issuance_timeout_s: float = ISSUANCE_TIMEOUT_S


@dataclass(frozen=True)
class Serving:
    """What a client needs once the certificate is served."""

    auto: AutoTLS
    host: str
    port: int
    server_name: str  # <ip-label>.<peer>.libp2p.direct: the SNI and the name to verify
    url: str
    forge_addresses: list[str]
    trust_roots_pem: list[str]  # local stack: Pebble's roots; production: empty (system)


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=30)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def identity(path: Path) -> PrivateKey:
    if path.exists():
        return load_private_key(path)
    key = PrivateKey.generate()
    save_private_key(key, path)
    return key


def announce_ip(options: Options) -> str:
    text = options.public_ip or options.host
    ip = ipaddress.ip_address(text)
    if ip.version != 4 or ip.is_unspecified:
        raise ValueError(
            f"cannot announce {text}: give --public-ip with the IPv4 address clients dial"
        )
    return str(ip)


async def serve(
    options: Options,
    *,
    ready: Callable[[Serving], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set; call ``ready`` once a real certificate is served."""
    stop = stop or asyncio.Event()
    public = announce_ip(options)
    data_dir = options.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = identity(data_dir / "identity.key")

    async with contextlib.AsyncExitStack() as resources:
        client: dict[str, Any]
        roots: list[str] = []
        if options.local_stack:
            stack = await resources.enter_async_context(LocalStack(data_dir / "stack"))
            client = stack.client_options()
            roots = stack.pebble.issuer_roots_pem()
        else:
            client = {
                "directory_url": LETS_ENCRYPT_STAGING if options.staging else LETS_ENCRYPT,
                "contact": options.contact,
            }

        registered: list[str] = []  # filled once both listeners are bound
        auto = AutoTLS(key, data_dir=data_dir, addresses=lambda: registered, **client)
        auto.on("loaded", lambda cert: _log_certificate("loaded", cert))
        auto.on("renewed", lambda cert: _log_certificate("renewed", cert))
        auto.on("failed", _log_failure)

        node = Libp2pNode(key, listen=[f"/ip4/{options.host}/tcp/{options.p2p_port}"])
        await resources.enter_async_context(node)
        p2p_port = Multiaddr.parse(node.listen_addresses[0]).value("tcp")

        app = web.Application()
        app.router.add_get("/ws", echo)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        resources.push_async_callback(runner.cleanup)
        # The live context: a placeholder now, the issued chain as soon as it is installed.
        site = web.TCPSite(runner, options.host, options.port, ssl_context=auto.ssl_context)
        await site.start()
        port = int(runner.addresses[0][1])

        registered += [
            f"/ip4/{public}/tcp/{p2p_port}",  # the broker's dial-back proves the PeerID here
            f"/ip4/{public}/tcp/{port}/tls/sni/*.libp2p.direct/ws",
        ]
        await resources.enter_async_context(auto)
        await asyncio.wait_for(auto.wait_for_certificate(), options.issuance_timeout_s)

        server_name = f"{ip_label(public)}.{auto.peer_id}.libp2p.direct"
        serving = Serving(
            auto=auto,
            host=public,
            port=port,
            server_name=server_name,
            url=f"wss://{server_name}:{port}/ws",
            forge_addresses=auto.forge_addresses(),
            trust_roots_pem=roots,
        )
        print(f"serving {serving.url}", flush=True)
        for address in serving.forge_addresses:
            print(f"announce {address}", flush=True)
        if ready is not None:
            result = ready(serving)
            if result is not None:
                await result
        await stop.wait()


def _log_certificate(how: str, cert: CertificateInfo) -> None:
    log.info("certificate %s: %s, valid until %s", how, cert.domain, cert.not_after.isoformat())


def _log_failure(failure: Failure) -> None:
    log.error("issuance failed (%s): %s", failure.error_class, failure.message)


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--local-stack", action="store_true", help="Pebble + local broker")
    parser.add_argument("--data-dir", type=Path, default=Options.data_dir)
    parser.add_argument(
        "--host",
        default=None,
        help="listen address (default 0.0.0.0, 127.0.0.1 with --local-stack)",
    )
    parser.add_argument("--port", type=int, default=None, help="WSS port (default 8443)")
    parser.add_argument("--p2p-port", type=int, default=None, help="libp2p port (default 4001)")
    parser.add_argument("--public-ip", default=None, help="IPv4 address to register")
    parser.add_argument("--staging", action="store_true", help="Let's Encrypt staging")
    parser.add_argument("--contact", action="append", default=[], metavar="mailto:ADDR")
    args = parser.parse_args(argv)
    local = bool(args.local_stack)
    return Options(
        data_dir=args.data_dir,
        local_stack=local,
        host=args.host or ("127.0.0.1" if local else "0.0.0.0"),  # noqa: S104 - a server
        port=args.port if args.port is not None else (0 if local else 8443),
        p2p_port=args.p2p_port if args.p2p_port is not None else (0 if local else 4001),
        public_ip=args.public_ip,
        staging=bool(args.staging),
        contact=list(args.contact),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = parse_options(argv)
    try:
        announce_ip(options)
    except ValueError as exc:
        print(f"aiohttp_wss: error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(options, stop=stop)

    try:
        asyncio.run(run())
    except Exception as exc:
        print(f"aiohttp_wss: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
