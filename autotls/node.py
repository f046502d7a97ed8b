"""The py-libp2p side of AutoTLS: a node the broker can dial, and the broker's dial-back.

This module owns everything that touches py-libp2p (the ``libp2p`` extra). It is imported
lazily: the rest of ``autotls`` works without py-libp2p, embedding applications supply their
own key and addresses, and only :meth:`Libp2pNode.start` / :func:`dial_back` need the extra
(a :class:`NodeError` names it when it is missing).

:class:`Libp2pNode` runs a py-libp2p host with the peer's identity key from asyncio;
:func:`dial_back` does what the production broker does before storing a DNS-01 value: a
throw-away host with a fresh key dials the given addresses and requires the secure channel
to authenticate the expected PeerId.

Facts about py-libp2p 0.8.1 this module relies on (each is exercised in tests/test_node.py):

Rooms: this module (the node and its listeners), :mod:`autotls.libp2p_host` (py-libp2p run
from asyncio: the trio thread, lazy imports, key pair, security), :mod:`autotls.dialback` (the
broker's dial-back, re-exported here).

* **Threads.** py-libp2p runs on trio. Each node (and each dial-back) gets its own
  ``trio.run`` in a dedicated thread; asyncio and trio talk only through thread-safe
  hand-offs (``TrioToken.run_sync_soon`` one way, ``loop.call_soon_threadsafe`` the other).
  Chosen over trio guest mode because py-libp2p does blocking work (importing it takes a
  second, RSA and handshake crypto are synchronous) that guest mode would run on the
  embedding application's event loop. ``stop()`` ends the host normally (its listeners close
  their sockets) and joins the thread: nothing is left behind.
* **Security.** Only Noise and Yamux are offered: py-libp2p's default set would also accept
  plaintext, SECIO and mplex, so ``sec_opt``/``muxer_opt`` are always passed explicitly. The
  dial-back offers Noise, then libp2p-TLS, as the broker's go-libp2p host offers both.
  ``BasicHost`` serves identify.
* **Secure WebSockets.** ``new_host(enable_websocket=True, tls_server_config=ctx)`` serves
  ``/tls/ws`` (and ``/wss``) listeners with *that* ``SSLContext`` object. The ``multiaddr``
  package rejects ``*`` in ``/sni/``, so ``/tls/sni/<name>/ws`` is translated to ``/tls/ws``;
  py-libp2p ignores SNI when listening anyway (the context decides what to serve), and when
  dialing it verifies the certificate against the dialed host, not the ``/sni/`` name.
* **Live renewal.** Each accepted connection is wrapped with the context at handshake time,
  so ``ctx.load_cert_chain()`` on the same context makes every *new* handshake serve the
  new chain; established connections keep theirs. No restart is needed.
* **No certificate, no handshakes.** A TLS listener whose context holds no certificate
  starts, but every handshake fails (clients see a reset or a hang until their timeout).
  The installer must load a self-signed placeholder before :meth:`Libp2pNode.start` and
  swap in the real chain with ``load_cert_chain()`` once it is issued.
* **Announced addresses.** The host announces what it bound: the WSS listener as
  ``/ip4/<ip>/tcp/<P>/wss``, a wildcard bind verbatim as ``0.0.0.0``/``::`` (no interface
  expansion), never a forge name. :attr:`Libp2pNode.announce_addresses` reports exactly that;
  the forge addresses must be built with :func:`autotls.multiaddrs.forge_addresses` from
  :attr:`Libp2pNode.listen_addresses` bound to concrete IPs (or the public ones you know).
* **Advertised addresses.** ``BasicHost(addrs_factory=...)`` (go-libp2p's AddrsFactory) is
  consulted by ``host.get_addrs()``, which identify calls for *every* response: its
  ``listenAddrs`` and its ``signedPeerRecord``, which ``env_to_send_in_RPC`` re-signs (new
  ``seq``) whenever the address set differs from the cached record's. The host builds one
  record at construction too (before any listener). So a factory that reads the
  certificate's state on each call makes identify and the peer record follow issuance,
  renewal, expiry and revocation without a restart: ``advertise`` is that hook
  (``AutoTLS.advertised_addresses`` for the forge addresses). Identify push goes out when a
  listener starts, not when the factory's answer changes: peers already connected see the
  change at their next identify.
* **Shared ports.** When a plain TCP and a WebSocket listen address share host and port,
  py-libp2p 0.8.1 routes both through a port demultiplexer that never terminates TLS for
  ``/tls/ws``. We never let it build one (listen addresses go to ``host.run``, not to
  ``new_host``) and reject such a pair with a clear error instead of a silent bind failure.
* **Failed listens are silent.** ``Swarm.listen`` swallows bind errors; :meth:`start` checks
  that every requested address got a listener and raises :class:`NodeError` naming the ones
  that did not.
* **AutoNAT.** py-libp2p 0.8.1 ships AutoNAT v1 (``libp2p.host.autonat``), and autotls does
  not use it to confirm reachability before registering, because it cannot confirm any:
  its server answers a dial request through ``BasicHost.connect``, which returns at once
  when a connection to the requester exists -- and the request itself came over one -- so
  a py-libp2p server reports any address with the requester's IP as reachable, a port
  nobody listens on included, without dialing it. Its client would need servers that do
  dial back (go-libp2p's, from a separate dialer host), which a node finds through peer
  routing this node does not run (no bootstrap peers, no DHT), and more than three of them
  to agree; and there is no AutoNAT v2, the per-address protocol the Go client waits on
  (``EvtHostReachableAddrsChanged``). What autotls checks instead: that the node offers an
  address the broker could dial at all (public, or private with
  ``allow_private_addresses``), and the broker's own dial-back.
* **Keys.** Ed25519, secp256k1 and RSA identities load through py-libp2p's protobuf
  deserialiser (Ed25519 in the 32-byte seed form it expects). py-libp2p 0.8.1 has no ECDSA
  deserialiser: an ECDSA identity is refused with :class:`NodeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotls.dialback import DialBackError, dial_back
from autotls.fsm.errors import ErrorClass
from autotls.libp2p_host import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    NodeError,
    Outcome,
    Portal,
    TrioThread,
    as_node_error,
    check_key_type,
    libp2p_key_pair,
    muxer_options,
    py_multiaddr,
    require_libp2p,
    running,
    security_options,
    unwrap,
)
from autotls.multiaddrs import Multiaddr, MultiaddrError
from autotls.peerid import PeerId, PrivateKey

if TYPE_CHECKING:
    from autotls.service import AutoTLS

__all__ = ["DialBackError", "Libp2pNode", "NodeError", "dial_back"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Listen:
    requested: Multiaddr  # what the caller asked for, as our canonical multiaddr
    tls: bool  # a secure WebSocket listener (/tls/ws, /tls/sni/.../ws, /wss)
    websocket: bool


def _classify_listen(ma: Multiaddr) -> _Listen:
    comps = ma.components
    if len(comps) < 2 or comps[0][0] not in ("ip4", "ip6") or comps[1][0] != "tcp":
        raise NodeError(
            f"unsupported listen address {ma}: expected /ip4|ip6/<ip>/tcp/<port>[/...]",
            error_class=ErrorClass.PERMANENT,
        )
    tail = tuple(name for name, _ in comps[2:])
    if tail == ():
        return _Listen(ma, tls=False, websocket=False)
    if tail == ("ws",):
        return _Listen(ma, tls=False, websocket=True)
    if tail in (("tls", "ws"), ("tls", "sni", "ws"), ("wss",)):
        return _Listen(ma, tls=True, websocket=True)
    raise NodeError(
        f"unsupported listen address {ma}: this node serves TCP, /ws and "
        "/tls/ws (/tls/sni/<name>/ws, /wss) only",
        error_class=ErrorClass.PERMANENT,
    )


def _plan_listeners(listen: Sequence[str], tls_context: ssl.SSLContext | None) -> list[_Listen]:
    if isinstance(listen, str):
        raise NodeError(
            "listen must be a sequence of multiaddr strings, not one string",
            error_class=ErrorClass.PERMANENT,
        )
    if not listen:
        raise NodeError(
            "a node needs at least one listen address", error_class=ErrorClass.PERMANENT
        )
    plans: list[_Listen] = []
    seen: dict[str, str] = {}  # "ip port" -> the address using it
    for text in listen:
        plan = _classify_listen(Multiaddr.parse(text))
        ma = plan.requested
        if plan.tls and tls_context is None:
            raise NodeError(
                f"listen address {ma} is a secure WebSocket listener but no tls_context was given",
                error_class=ErrorClass.PERMANENT,
            )
        if plan.websocket and not plan.tls and tls_context is not None:
            # py-libp2p 0.8.1 hands its one server context to every WebSocket listener, so a
            # plain /ws listener would silently speak TLS.
            raise NodeError(
                f"listen address {ma} is a plain WebSocket listener, which py-libp2p would "
                "serve with TLS once a tls_context is given; use /tls/ws",
                error_class=ErrorClass.PERMANENT,
            )
        ip, port = ma.components[0][1], ma.components[1][1]
        key = f"{ip} {port}"
        if key in seen and port != "0":
            raise NodeError(
                f"listen addresses {seen[key]} and {ma} share a port; py-libp2p 0.8.1 cannot "
                "serve two transports on one port with TLS: give each its own port",
                error_class=ErrorClass.PERMANENT,
            )
        seen[key] = str(ma)
        plans.append(plan)
    return plans


def _with_port(ma: Multiaddr, port: str) -> Multiaddr:
    comps = list(ma.components)
    comps[1] = ("tcp", port)
    return Multiaddr(tuple(comps))


def _in_listen_order(announced: list[str], bound: list[str]) -> list[str]:
    """py-libp2p starts listeners concurrently, so its address order varies from run to run;
    report announced addresses in the order of the listen addresses they come from."""
    ports = [Multiaddr.parse(a).value("tcp") for a in bound]

    def rank(item: tuple[int, str]) -> tuple[int, int]:
        port = Multiaddr.parse(item[1]).value("tcp")
        return (ports.index(port) if port in ports else len(ports), item[0])

    return [address for _, address in sorted(enumerate(announced), key=rank)]


@dataclass(frozen=True)
class _Bound:
    listen: list[str]
    announce: list[str]


class Libp2pNode:
    """A py-libp2p host with the peer's identity, run from asyncio.

    TCP + Noise + Yamux + identify, plus a secure WebSocket listener serving ``tls_context``
    for each ``/tls/ws`` (or ``/tls/sni/*.libp2p.direct/ws``, ``/wss``) listen address. Use
    ``async with`` or :meth:`start`/:meth:`stop`; a stopped node can be started again.

    ``autotls`` wires the node and an :class:`autotls.AutoTLS` together in one step: the
    node serves its ``ssl_context`` and advertises its ``advertised_addresses`` (unless
    ``tls_context`` / ``advertise`` are given), and the facade registers the node's listen
    addresses with the broker (:meth:`autotls.AutoTLS.attach`).

    ``advertise`` returns addresses to advertise next to the host's own, in identify's
    ``listenAddrs`` and in its signed peer record; with ``AutoTLS.advertised_addresses`` the
    forge addresses appear while a valid certificate is held. It is called from the node's
    own thread on every identify request, so it must be quick and only read shared state; an
    exception or a malformed address it returns is logged and left out, never breaking
    identify.
    """

    def __init__(
        self,
        key: PrivateKey,
        *,
        listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/4001",),
        tls_context: ssl.SSLContext | None = None,
        advertise: Callable[[], Sequence[str]] | None = None,
        autotls: AutoTLS | None = None,
    ) -> None:
        if autotls is not None:
            tls_context = tls_context or autotls.ssl_context
            advertise = advertise or autotls.advertised_addresses
        check_key_type(key)
        self._key = key
        self._plans = _plan_listeners(listen, tls_context)
        self._tls_context = tls_context
        self._advertise = advertise
        self._advertise_trouble: str | None = None  # the last complaint logged, not repeated
        self.peer_id: PeerId = key.peer_id
        self.listen_addresses: list[str] = []
        self.announce_addresses: list[str] = []
        self._runner: TrioThread[None] | None = None
        if autotls is not None:
            autotls.attach(self)

    @property
    def running(self) -> bool:
        return self._runner is not None and self._runner.is_running()

    @property
    def advertised_addresses(self) -> list[str]:
        """What identify tells peers now: :attr:`announce_addresses`, then what ``advertise``
        adds (empty while stopped)."""
        if not self.announce_addresses:
            return []
        return list(dict.fromkeys([*self.announce_addresses, *self._extra_addresses()]))

    def _extra_addresses(self) -> list[str]:
        """``advertise()``'s addresses, canonical, malformed ones logged and dropped."""
        if self._advertise is None:
            return []
        try:
            wanted = list(self._advertise())
        except Exception as exc:
            self._complain(f"advertise() failed: {type(exc).__name__}: {exc}")
            return []
        extra: list[str] = []
        for text in wanted:
            try:
                extra.append(str(Multiaddr.parse(text)))
            except MultiaddrError as exc:
                self._complain(f"advertise() returned {exc}")
        return extra

    def _complain(self, trouble: str) -> None:
        # Identify asks on every connection: say each distinct problem once, not per peer.
        if trouble != self._advertise_trouble:
            self._advertise_trouble = trouble
            log.warning(
                "libp2p node %s: %s; advertising the host's own addresses", self.peer_id, trouble
            )

    def _addrs_factory(self, candidates: list[Any]) -> list[Any]:
        """py-libp2p's AddrsFactory (runs in the node's thread): the host's own addresses,
        then ours."""
        from multiaddr import Multiaddr as PyMultiaddr

        result = list(candidates)
        seen = {str(a) for a in candidates}
        for text in self._extra_addresses():
            if text in seen:
                continue
            try:
                result.append(PyMultiaddr(text))
            except Exception as exc:  # the multiaddr package knows fewer protocols than we do
                self._complain(f"py-libp2p cannot carry {text}: {exc}")
                continue
            seen.add(text)
        return result

    async def start(self) -> None:
        """Start the host and bind every listen address; raises :class:`NodeError` (naming
        the addresses) when one cannot be bound, or the key/extra is unusable."""
        if self._runner is not None:
            raise NodeError(f"node {self.peer_id} is already started")
        require_libp2p()
        runner: TrioThread[None] = TrioThread(f"autotls-libp2p-node-{self.peer_id}")
        self._runner = runner
        runner.launch(self._serve)
        try:
            started = await asyncio.wait_for(asyncio.shield(runner.ready), START_TIMEOUT)
            bound = started.unwrap()
        except BaseException as exc:
            self._runner = None
            with contextlib.suppress(BaseException):
                await runner.finish(STOP_TIMEOUT)
            if isinstance(exc, TimeoutError):
                raise NodeError(f"node did not start within {START_TIMEOUT}s") from None
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise as_node_error(exc, "node failed to start") from exc
        assert isinstance(bound, _Bound)
        self.listen_addresses = bound.listen
        self.announce_addresses = bound.announce
        runner.done.add_done_callback(self._report_crash)
        log.info("libp2p node %s listening on %s", self.peer_id, ", ".join(bound.listen))

    async def stop(self) -> None:
        """Close the host (listeners and connections) and join its thread. Idempotent. If
        the host crashed while running, this raises that failure as :class:`NodeError`."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            await runner.finish(STOP_TIMEOUT)
        except NodeError:
            raise
        except Exception as exc:
            raise as_node_error(exc, "node stopped with an error") from exc
        finally:
            self.listen_addresses = []
            self.announce_addresses = []
        log.info("libp2p node %s stopped", self.peer_id)

    async def __aenter__(self) -> Libp2pNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _report_crash(self, done: asyncio.Future[Outcome[None]]) -> None:
        outcome = done.result()
        if not outcome.ok and self._runner is not None:
            log.error("libp2p node %s crashed: %s", self.peer_id, unwrap(outcome.value))

    async def _serve(self, portal: Portal) -> None:
        """Runs in the node's trio thread."""
        from libp2p import new_host

        pair = libp2p_key_pair(self._key)
        websocket = any(plan.websocket for plan in self._plans)
        host = new_host(
            key_pair=pair,
            sec_opt=security_options(pair, with_tls=False),
            muxer_opt=muxer_options(),
            enable_tcp=True,
            enable_websocket=websocket,
            tls_server_config=self._tls_context,
            addrs_factory=self._addrs_factory if self._advertise is not None else None,
        )
        targets = [(plan, py_multiaddr(plan.requested)) for plan in self._plans]
        failure: NodeError | None = None
        async with running(host, [target for _, target in targets]):
            listeners = host.get_network().listeners
            bound: list[str] = []
            missing: list[str] = []
            for plan, target in targets:
                listener = listeners.get(str(target))
                addrs = listener.get_addrs() if listener is not None else ()
                if not addrs:
                    missing.append(str(plan.requested))
                    continue
                bound.append(
                    str(_with_port(plan.requested, str(addrs[0].value_for_protocol("tcp"))))
                )
            if missing:
                failure = NodeError(
                    f"could not listen on {', '.join(missing)} (address in use or not local?)"
                )
            else:
                announce = _in_listen_order(
                    [str(Multiaddr.parse(str(a))) for a in host.get_transport_addrs()], bound
                )
                portal.ready(_Bound(listen=bound, announce=announce))
                await portal.stop.wait()
        if failure is not None:
            raise failure
