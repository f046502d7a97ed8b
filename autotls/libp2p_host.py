"""py-libp2p from asyncio: what the node and the dial-back share.

py-libp2p runs on trio; each host gets its own ``trio.run`` in a dedicated thread
(:class:`TrioThread`), and asyncio and trio talk only through thread-safe hand-offs. This
module also imports py-libp2p lazily (the ``libp2p`` extra), builds its key pair from ours
(checked to give the same PeerId), and offers exactly Noise (+ TLS for dialing) and Yamux.
The facts these rely on are listed in :mod:`autotls.node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from autotls.fsm.errors import AutoTLSError, ErrorClass
from autotls.multiaddrs import Multiaddr
from autotls.peerid import KeyType, PrivateKey

if TYPE_CHECKING:
    import trio

log = logging.getLogger("autotls.node")

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

# How long start() waits for the host to bind, and stop() for it to wind down, before giving
# up. Both are local operations; these bound a wedged py-libp2p, not the network.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

EXTRA_HINT = (
    "py-libp2p is not installed: install the 'libp2p' extra (pip install 'autotls[libp2p]')"
)


class NodeError(AutoTLSError):
    """The py-libp2p node could not be configured, started or stopped."""


# --------------------------------------------------------------------------------------------
# py-libp2p, imported lazily
# --------------------------------------------------------------------------------------------


def require_libp2p() -> None:
    """Fail fast, on the caller's side, when the extra is missing (the import itself, which
    is slow, happens in the trio thread)."""
    for module in ("libp2p", "trio"):
        if importlib.util.find_spec(module) is None:
            raise NodeError(EXTRA_HINT, error_class=ErrorClass.PERMANENT)


def libp2p_key_pair(key: PrivateKey) -> Any:
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


def check_key_type(key: PrivateKey) -> None:
    if key.key_type is KeyType.ECDSA:
        raise NodeError(
            "py-libp2p 0.8.1 cannot load ECDSA identity keys; use Ed25519, secp256k1 or RSA",
            error_class=ErrorClass.PERMANENT,
        )


def security_options(pair: Any, *, with_tls: bool) -> dict[Any, Any]:
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


def muxer_options() -> dict[Any, Any]:
    from libp2p.custom_types import TProtocol
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    return {TProtocol(YAMUX_ID): Yamux}


def py_multiaddr(ma: Multiaddr, *, for_dialing: bool = False) -> Any:
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
class Outcome(Generic[_T_co]):
    """How a trio run (or its start-up) ended, carried to asyncio as a value so that an
    exception nobody awaits is never left inside a future."""

    ok: bool
    value: Any

    def unwrap(self) -> _T_co:
        if not self.ok:
            raise self.value
        result: _T_co = self.value
        return result


class Portal:
    """What the trio side of a :class:`TrioThread` sees: a way to report readiness and an
    event set when the asyncio side asks it to finish."""

    def __init__(self, runner: TrioThread[Any], stop: trio.Event) -> None:
        self._runner = runner
        self.stop = stop

    def ready(self, value: object) -> None:
        self._runner._post(self._runner._set_ready, value)


class TrioThread(Generic[_T]):
    """One ``trio.run(main)`` in a dedicated thread. ``ready`` resolves when ``main`` reports
    readiness through its portal (or ends first), ``done`` when the run is over and the thread
    has exited; both carry :class:`Outcome` values."""

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
        self.ready: asyncio.Future[Outcome[object]]
        self.done: asyncio.Future[Outcome[_T]]

    def launch(self, main: Callable[[Portal], Awaitable[_T]]) -> None:
        self._loop = asyncio.get_running_loop()
        self.ready = self._loop.create_future()
        self.done = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(main,), name=self._name)
        # daemon: a py-libp2p that refuses to stop must not also keep the interpreter alive
        self._thread.daemon = True
        self._thread.start()

    # -- trio thread ---------------------------------------------------------------------

    def _run(self, main: Callable[[Portal], Awaitable[_T]]) -> None:
        outcome: Outcome[_T]
        try:
            import trio

            outcome = Outcome(True, trio.run(self._entry, main))
        except BaseException as exc:  # handed to the asyncio side, which re-raises it
            outcome = Outcome(False, exc)
        self._post(self._finish, outcome)

    async def _entry(self, main: Callable[[Portal], Awaitable[_T]]) -> _T:
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
            return await main(Portal(self, stop))
        raise NodeError("py-libp2p was cancelled after it did not stop in time")

    def _post(self, callback: Callable[[Any], None], value: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(callback, value)

    # -- asyncio thread ------------------------------------------------------------------

    def _set_ready(self, value: object) -> None:
        if not self.ready.done():
            self.ready.set_result(Outcome(True, value))

    def _finish(self, outcome: Outcome[_T]) -> None:
        if not self.ready.done():
            early = NodeError("py-libp2p finished before it was ready")
            self.ready.set_result(outcome if not outcome.ok else Outcome(False, early))
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
async def running(host: Any, listen: list[Any]) -> AsyncIterator[None]:
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


def unwrap(exc: BaseException) -> BaseException:
    """The single meaningful exception inside trio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def as_node_error(exc: BaseException, what: str) -> AutoTLSError:
    inner = unwrap(exc)
    if isinstance(inner, AutoTLSError):
        return inner
    if isinstance(inner, ImportError):
        return NodeError(f"{EXTRA_HINT} ({inner})", error_class=ErrorClass.PERMANENT)
    return NodeError(f"{what}: {type(inner).__name__}: {inner}")
