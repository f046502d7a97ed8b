"""The local stack: everything a real issuance needs, on loopback, from one object.

* Pebble (the ACME CA) and pebble-challtestsrv (its DNS), started as subprocesses on free
  ports with a TLS certificate generated at start (:mod:`autotls.localstack.pebble`);
* the local broker, which authenticates peers with libp2p-PeerID auth, dials them back over
  real libp2p, and publishes their TXT record in challtestsrv (:mod:`autotls.localstack.broker`).

The node side (a py-libp2p host with its identity key) is the caller's: the demo, the tests
and the benchmarks bring their own. :meth:`LocalStack.client_options` gives the settings an
:class:`autotls.AutoTLS` needs to use this stack instead of Let's Encrypt and p2p-forge.
Everything started is stopped by :meth:`LocalStack.stop` (also on errors and Ctrl-C, when
used as ``async with``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from cryptography import x509

from autotls.localstack.broker import LocalBroker
from autotls.localstack.pebble import PebbleOptions, PebbleStack

log = logging.getLogger(__name__)


class LocalStack:
    def __init__(
        self,
        workdir: str | Path,
        *,
        pebble_options: PebbleOptions | None = None,
        broker_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.pebble = PebbleStack(self.workdir / "pebble", pebble_options or PebbleOptions())
        self._broker_kwargs = broker_kwargs or {}
        self.broker: LocalBroker | None = None

    async def start(self) -> LocalStack:
        await asyncio.to_thread(self.pebble.start)
        try:
            self.broker = LocalBroker(
                challtestsrv_url=self.pebble.challtestsrv_url, **self._broker_kwargs
            )
            await self.broker.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "local stack up: ACME %s, DNS %s:%d, broker %s",
            self.pebble.directory_url,
            *self.pebble.dns_address,
            self.broker.url,
        )
        return self

    async def stop(self) -> None:
        broker, self.broker = self.broker, None
        try:
            if broker is not None:
                await broker.stop()
        finally:
            await asyncio.to_thread(self.pebble.stop)

    async def __aenter__(self) -> LocalStack:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def broker_url(self) -> str:
        if self.broker is None:
            raise RuntimeError("local stack is not started")
        return self.broker.url

    @property
    def dns_server(self) -> str:
        host, port = self.pebble.dns_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def trust_roots(self) -> list[x509.Certificate]:
        """The roots Pebble signs issued certificates with (not its HTTPS certificate)."""
        roots: list[x509.Certificate] = []
        for pem in self.pebble.issuer_roots_pem():
            roots.extend(x509.load_pem_x509_certificates(pem.encode()))
        return roots

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`autotls.AutoTLS` that point it at this stack."""
        return {
            "directory_url": self.pebble.directory_url,
            "ca_file": str(self.pebble.ca_file),
            "broker_url": self.broker_url,
            "dns_servers": [self.dns_server],
            "allow_private_addresses": True,
            "trust_roots": self.trust_roots(),
        }
