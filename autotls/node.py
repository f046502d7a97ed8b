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
* **Keys.** Ed25519, secp256k1 and RSA identities load through py-libp2p's protobuf
  deserialiser (Ed25519 in the 32-byte seed form it expects). py-libp2p 0.8.1 has no ECDSA
  deserialiser: an ECDSA identity is refused with :class:`NodeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import re
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from autotls.fsm.errors import AutoTLSError, ErrorClass
from autotls.multiaddrs import Multiaddr, MultiaddrError
from autotls.peerid import KeyType, PeerId, PeerIdError, PrivateKey

if TYPE_CHECKING:
    import trio

__all__ = ["DialBackError", "Libp2pNode", "NodeError", "dial_back"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

# How long start() waits for the host to bind, and stop() for it to wind down, before giving
# up. Both are local operations; these bound a wedged py-libp2p, not the network.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_EXTRA_HINT = (
    "py-libp2p is not installed: install the 'libp2p' extra (pip install 'autotls[libp2p]')"
)


class NodeError(AutoTLSError):
    """The py-libp2p node could not be configured, started or stopped."""


class DialBackError(Exception):
    """The dial-back failed. ``reason`` is the human summary ("no address answered",
    "peer id mismatch: expected X, got Y", "timeout after 15s", ...); ``failures`` maps each
    address that was tried or skipped to why it did not prove the peer."""

    def __init__(self, reason: str, failures: dict[str, str] | None = None) -> None:
        self.reason = reason
        self.failures: dict[str, str] = dict(failures or {})
        detail = "; ".join(f"{addr}: {why}" for addr, why in self.failures.items())
        super().__init__(f"{reason} ({detail})" if detail else reason)


# --------------------------------------------------------------------------------------------
# py-libp2p, imported lazily
# --------------------------------------------------------------------------------------------


def _require_libp2p() -> None:
    """Fail fast, on the caller's side, when the extra is missing (the import itself, which
    is slow, happens in the trio thread)."""
    for module in ("libp2p", "trio"):
        if importlib.util.find_spec(module) is None:
            raise NodeError(_EXTRA_HINT, error_class=ErrorClass.PERMANENT)


def _libp2p_key_pair(key: PrivateKey) -> Any:
    """Our identity key as a py-libp2p ``KeyPair``, checked to give the same PeerId."""
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.serialization import deserialize_private_key
    from libp2p.peer.id import ID

    private = deserialize_private_key(key.to_proto(ed25519_seed_only=True))
    pair = KeyPair(private, private.get_public_key())
    if ID.from_pubkey(pair.public_key).to_base58() != key.peer_id.to_base58():
        raise NodeError(
            f"py-libp2p derives another PeerId from this {key.key_type.name} key than "
            f"{key.peer_id.to_base58()}",
            error_class=ErrorClass.PERMANENT,
        )
    return pair


def _check_key_type(key: PrivateKey) -> None:
    if key.key_type is KeyType.ECDSA:
        raise NodeError(
            "py-libp2p 0.8.1 cannot load ECDSA identity keys; use Ed25519, secp256k1 or RSA",
            error_class=ErrorClass.PERMANENT,
        )


def _security_options(pair: Any, *, with_tls: bool) -> dict[Any, Any]:
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.custom_types import TProtocol
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    options: dict[Any, Any] = {
        TProtocol(NOISE_ID): NoiseTransport(pair, noise_privkey=new_x25519().private_key)
    }
    if with_tls:
        from libp2p.security.tls.transport import PROTOCOL_ID as TLS_ID
        from libp2p.security.tls.transport import TLSTransport

        options[TProtocol(TLS_ID)] = TLSTransport(pair)
    return options


def _muxer_options() -> dict[Any, Any]:
    from libp2p.custom_types import TProtocol
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    return {TProtocol(YAMUX_ID): Yamux}


def _py_multiaddr(ma: Multiaddr, *, for_dialing: bool = False) -> Any:
    """The ``multiaddr`` package's object for ``ma``, without the ``/sni/`` component that
    package cannot parse with a wildcard (and py-libp2p does not use).

    For dialing, ``/tls/ws`` becomes ``/wss``: the swarm appends ``/p2p/<id>`` to what it
    dials, and py-libp2p's WebSocket transport accepts that suffix after ``/wss`` only."""
    from multiaddr import Multiaddr as PyMultiaddr

    comps = [c for c in ma.components if c[0] != "sni"]
    if for_dialing and [name for name, _ in comps[-2:]] == ["tls", "ws"]:
        comps[-2:] = [("wss", None)]
    return PyMultiaddr(str(Multiaddr(tuple(comps))))


# --------------------------------------------------------------------------------------------
# One trio.run in its own thread, reporting to the asyncio loop that launched it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome(Generic[_T_co]):
    """How a trio run (or its start-up) ended, carried to asyncio as a value so that an
    exception nobody awaits is never left inside a future."""

    ok: bool
    value: Any

    def unwrap(self) -> _T_co:
        if not self.ok:
            raise self.value
        result: _T_co = self.value
        return result


class _Portal:
    """What the trio side of a :class:`_TrioThread` sees: a way to report readiness and an
    event set when the asyncio side asks it to finish."""

    def __init__(self, runner: _TrioThread[Any], stop: trio.Event) -> None:
        self._runner = runner
        self.stop = stop

    def ready(self, value: object) -> None:
        self._runner._post(self._runner._set_ready, value)


class _TrioThread(Generic[_T]):
    """One ``trio.run(main)`` in a dedicated thread. ``ready`` resolves when ``main`` reports
    readiness through its portal (or ends first), ``done`` when the run is over and the thread
    has exited; both carry :class:`_Outcome` values."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._token: Any = None  # trio.lowlevel.TrioToken once the run has started
        self._stop: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._stop_requested = False
        self._cancel_requested = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready: asyncio.Future[_Outcome[object]]
        self.done: asyncio.Future[_Outcome[_T]]

    def launch(self, main: Callable[[_Portal], Awaitable[_T]]) -> None:
        self._loop = asyncio.get_running_loop()
        self.ready = self._loop.create_future()
        self.done = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(main,), name=self._name)
        # daemon: a py-libp2p that refuses to stop must not also keep the interpreter alive
        self._thread.daemon = True
        self._thread.start()

    # -- trio thread ---------------------------------------------------------------------

    def _run(self, main: Callable[[_Portal], Awaitable[_T]]) -> None:
        outcome: _Outcome[_T]
        try:
            import trio

            outcome = _Outcome(True, trio.run(self._entry, main))
        except BaseException as exc:  # handed to the asyncio side, which re-raises it
            outcome = _Outcome(False, exc)
        self._post(self._finish, outcome)

    async def _entry(self, main: Callable[[_Portal], Awaitable[_T]]) -> _T:
        import trio

        stop = trio.Event()
        with trio.CancelScope() as scope:
            with self._lock:
                self._token = trio.lowlevel.current_trio_token()
                self._stop, self._scope = stop, scope
                if self._stop_requested:
                    stop.set()
                if self._cancel_requested:
                    scope.cancel()
            return await main(_Portal(self, stop))
        raise NodeError("py-libp2p was cancelled after it did not stop in time")

    def _post(self, callback: Callable[[Any], None], value: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(callback, value)

    # -- asyncio thread ------------------------------------------------------------------

    def _set_ready(self, value: object) -> None:
        if not self.ready.done():
            self.ready.set_result(_Outcome(True, value))

    def _finish(self, outcome: _Outcome[_T]) -> None:
        if not self.ready.done():
            early = NodeError("py-libp2p finished before it was ready")
            self.ready.set_result(outcome if not outcome.ok else _Outcome(False, early))
        if not self.done.done():
            self.done.set_result(outcome)
        if self._thread is not None:
            self._thread.join()  # it has returned from _run already: this does not block

    def _call_in_trio(self, action: Callable[[], None]) -> None:
        import trio

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(action)

    def request_stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            if self._token is not None and self._stop is not None:
                self._call_in_trio(self._stop.set)

    def cancel(self) -> None:
        with self._lock:
            self._cancel_requested = True
            if self._token is not None and self._scope is not None:
                self._call_in_trio(self._scope.cancel)

    async def finish(self, grace: float) -> _T:
        """Ask the trio side to finish, wait for it (cancelling it after ``grace`` seconds),
        and return its result or raise its exception."""
        self.request_stop()
        try:
            outcome = await asyncio.wait_for(asyncio.shield(self.done), grace)
        except TimeoutError:
            log.warning("py-libp2p did not stop within %ss; cancelling it", grace)
            self.cancel()
            try:
                outcome = await asyncio.wait_for(asyncio.shield(self.done), grace)
            except TimeoutError:
                raise NodeError(f"py-libp2p thread {self._name} did not stop") from None
        return outcome.unwrap()

    def is_running(self) -> bool:
        return self._thread is not None and not self.done.done()


@contextlib.asynccontextmanager
async def _running(host: Any, listen: list[Any]) -> AsyncIterator[None]:
    """``host.run(listen)`` ending with an explicit ``host.close()``: leaving ``run`` alone
    cancels py-libp2p's tasks but leaves dialed sockets open for the garbage collector."""
    import trio

    async with host.run(listen):
        try:
            yield
        finally:
            with trio.move_on_after(STOP_TIMEOUT) as closing:
                closing.shield = True
                await host.close()


def _unwrap(exc: BaseException) -> BaseException:
    """The single meaningful exception inside trio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------


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

    ``advertise`` returns addresses to advertise next to the host's own, in identify's
    ``listenAddrs`` and in its signed peer record; pass ``AutoTLS.advertised_addresses`` and
    the forge addresses appear while a valid certificate is held. It is called from the
    node's own thread on every identify request, so it must be quick and only read shared
    state; an exception or a malformed address it returns is logged and left out, never
    breaking identify.
    """

    def __init__(
        self,
        key: PrivateKey,
        *,
        listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/4001",),
        tls_context: ssl.SSLContext | None = None,
        advertise: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        _check_key_type(key)
        self._key = key
        self._plans = _plan_listeners(listen, tls_context)
        self._tls_context = tls_context
        self._advertise = advertise
        self._advertise_trouble: str | None = None  # the last complaint logged, not repeated
        self.peer_id: PeerId = key.peer_id
        self.listen_addresses: list[str] = []
        self.announce_addresses: list[str] = []
        self._runner: _TrioThread[None] | None = None

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
        _require_libp2p()
        runner: _TrioThread[None] = _TrioThread(f"autotls-libp2p-node-{self.peer_id}")
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
            raise _as_node_error(exc, "node failed to start") from exc
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
            raise _as_node_error(exc, "node stopped with an error") from exc
        finally:
            self.listen_addresses = []
            self.announce_addresses = []
        log.info("libp2p node %s stopped", self.peer_id)

    async def __aenter__(self) -> Libp2pNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _report_crash(self, done: asyncio.Future[_Outcome[None]]) -> None:
        outcome = done.result()
        if not outcome.ok and self._runner is not None:
            log.error("libp2p node %s crashed: %s", self.peer_id, _unwrap(outcome.value))

    async def _serve(self, portal: _Portal) -> None:
        """Runs in the node's trio thread."""
        from libp2p import new_host

        pair = _libp2p_key_pair(self._key)
        websocket = any(plan.websocket for plan in self._plans)
        host = new_host(
            key_pair=pair,
            sec_opt=_security_options(pair, with_tls=False),
            muxer_opt=_muxer_options(),
            enable_tcp=True,
            enable_websocket=websocket,
            tls_server_config=self._tls_context,
            addrs_factory=self._addrs_factory if self._advertise is not None else None,
        )
        targets = [(plan, _py_multiaddr(plan.requested)) for plan in self._plans]
        failure: NodeError | None = None
        async with _running(host, [target for _, target in targets]):
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


def _as_node_error(exc: BaseException, what: str) -> AutoTLSError:
    inner = _unwrap(exc)
    if isinstance(inner, AutoTLSError):
        return inner
    if isinstance(inner, ImportError):
        return NodeError(f"{_EXTRA_HINT} ({inner})", error_class=ErrorClass.PERMANENT)
    return NodeError(f"{what}: {type(inner).__name__}: {inner}")


# --------------------------------------------------------------------------------------------
# The broker's dial-back
# --------------------------------------------------------------------------------------------

_DIALABLE_TAILS = frozenset({(), ("ws",), ("tls", "ws"), ("tls", "sni", "ws"), ("wss",)})
_MISMATCH_GOT = re.compile(r"(?:remote_peer_id_from_pubkey=|got )([1-9A-HJ-NP-Za-km-z]+)")


def _plan_dial(peer_id: PeerId, text: str) -> tuple[Multiaddr | None, str | None]:
    """(the address to dial, or None with the reason it is skipped)."""
    try:
        ma = Multiaddr.parse(text)
    except MultiaddrError as exc:
        raise DialBackError(f"malformed address: {exc}") from None
    base, named = ma.without_peer()
    if named is not None:
        try:
            if PeerId.from_string(named) != peer_id:
                return None, f"names another peer ({named})"
        except PeerIdError:  # pragma: no cover - Multiaddr.parse validated it
            return None, f"bad peer id {named}"
    if base.has("p2p-circuit"):
        return None, "relay addresses are not dialed"
    comps = base.components
    if len(comps) < 2 or comps[0][0] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return None, "unsupported address (this dialer speaks TCP and WebSockets)"
    tail = tuple(name for name, _ in comps[2:])
    if comps[1][0] != "tcp" or tail not in _DIALABLE_TAILS:
        return None, "unsupported transport (this dialer speaks TCP and WebSockets)"
    if comps[1][1] == "0":
        return None, "port 0"
    return base, None


def _explain(exc: BaseException) -> tuple[str, str | None]:
    """(why one dial failed, the PeerId that answered instead if it was someone else)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    messages: list[str] = []
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current)
        if type(current).__name__ == "PeerIDMismatchesPubkey" or "Peer ID mismatch" in text:
            match = _MISMATCH_GOT.search(text)
            return "peer id mismatch", match.group(1) if match else "another peer"
        if text:
            messages.append(text)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
    for current_text in messages:
        if "Connection refused" in current_text or "Errno 111" in current_text:
            return "connection refused", None
    return (messages[-1] if messages else type(exc).__name__)[:200], None


async def _dial_main(
    portal: _Portal,
    peer_id: PeerId,
    plan: list[tuple[str, Multiaddr]],
    dial_seconds: float,
    tls_client_context: ssl.SSLContext | None,
) -> tuple[str | None, dict[str, str], dict[str, str], bool]:
    """Runs in the dial-back's trio thread: (winner, failures, mismatches, timed out)."""
    import trio
    from libp2p import new_swarm
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.host.basic_host import BasicHost
    from libp2p.network.config import RetryConfig
    from libp2p.peer.id import ID

    pair = create_new_key_pair()
    swarm = new_swarm(
        key_pair=pair,
        sec_opt=_security_options(pair, with_tls=True),
        muxer_opt=_muxer_options(),
        enable_tcp=True,
        enable_websocket=True,
        tls_client_config=tls_client_context,
        # One attempt per address, like the broker: retries would only stretch a refusal
        # into the whole timeout, and a wrong peer does not become right on the second try.
        retry_config=RetryConfig(max_retries=0),
    )
    host = BasicHost(network=swarm)
    expected = ID(peer_id.multihash)
    winner: str | None = None
    failures: dict[str, str] = {}
    mismatches: dict[str, str] = {}

    async with _running(host, []), trio.open_nursery() as watch:
        dials = trio.CancelScope(deadline=trio.current_time() + dial_seconds)

        async def stop_on_request() -> None:
            await portal.stop.wait()
            dials.cancel()

        watch.start_soon(stop_on_request)
        with dials:
            async with trio.open_nursery() as nursery:
                for original, target in plan:

                    async def attempt(original: str = original, target: Multiaddr = target) -> None:
                        nonlocal winner
                        try:
                            await swarm.dial_addr(_py_multiaddr(target, for_dialing=True), expected)
                        except Exception as exc:
                            why, other = _explain(exc)
                            failures[original] = why if other is None else f"{why}: {other}"
                            if other is not None:
                                mismatches[original] = other
                            return
                        if winner is None:
                            winner = original
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(attempt)
        timed_out = dials.cancelled_caught and winner is None and not portal.stop.is_set()
        watch.cancel_scope.cancel()
    return winner, failures, mismatches, timed_out


async def dial_back(
    peer_id: PeerId,
    addresses: Sequence[str],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109 - the broker's dial timeout is part of the contract
    tls_client_context: ssl.SSLContext | None = None,
) -> str:
    """Prove that ``peer_id`` is reachable at one of ``addresses``, as the broker does.

    A throw-away py-libp2p host with a fresh Ed25519 key dials every supported address at
    once (TCP, ``/ws``, ``/tls/ws``, ``/wss``; security Noise or libp2p-TLS; Yamux) and
    requires the secure channel to authenticate ``peer_id``. The first address that does is
    returned and the host is torn down. ``timeout`` bounds the dialing (15 s, the broker's
    dial timeout); starting and closing the throw-away host adds a few milliseconds. Secure
    WebSocket certificates are verified with ``tls_client_context`` (default: the system
    trust store) against the dialed host.

    Raises :class:`DialBackError` with the reason: malformed address, no dialable address,
    peer id mismatch, timeout, or no address answered. Raises :class:`NodeError` when
    py-libp2p is not installed.
    """
    if isinstance(addresses, str):
        raise DialBackError("addresses must be a sequence of multiaddr strings, not one string")
    if timeout <= 0:
        raise DialBackError(f"timeout must be positive, got {timeout}")
    plan: list[tuple[str, Multiaddr]] = []
    skipped: dict[str, str] = {}
    for text in dict.fromkeys(addresses):
        target, why = _plan_dial(peer_id, text)
        if target is None:
            skipped[text] = why or "skipped"
        else:
            plan.append((text, target))
    if not plan:
        raise DialBackError("no dialable address", skipped)
    _require_libp2p()

    async def main(portal: _Portal) -> tuple[str | None, dict[str, str], dict[str, str], bool]:
        return await _dial_main(portal, peer_id, plan, timeout, tls_client_context)

    runner: _TrioThread[tuple[str | None, dict[str, str], dict[str, str], bool]]
    runner = _TrioThread(f"autotls-dial-back-{peer_id}")
    runner.launch(main)
    try:
        winner, failures, mismatches, timed_out = (await asyncio.shield(runner.done)).unwrap()
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await runner.finish(STOP_TIMEOUT)
        raise
    except Exception as exc:
        raise _as_node_error(exc, "dial-back host failed") from exc
    failures = {**skipped, **failures}
    if winner is not None:
        log.info("dial-back to %s succeeded at %s", peer_id, winner)
        return winner
    if mismatches:
        other = next(iter(mismatches.values()))
        raise DialBackError(
            f"peer id mismatch: expected {peer_id.to_base58()}, got {other}", failures
        )
    if timed_out:
        raise DialBackError(f"timeout after {timeout:g}s", failures)
    raise DialBackError("no address answered", failures)
