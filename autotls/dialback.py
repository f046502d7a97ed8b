"""The broker's dial-back, as the production broker does it before storing a DNS-01 value:
a throw-away py-libp2p host with a fresh key dials the given addresses and requires the
secure channel to authenticate the expected PeerId. The local broker uses it; so do tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Sequence
from typing import Any, cast

from autotls.libp2p_host import (
    STOP_TIMEOUT,
    Portal,
    TrioThread,
    as_node_error,
    muxer_options,
    py_multiaddr,
    require_libp2p,
    running,
    security_options,
)
from autotls.multiaddrs import Multiaddr, MultiaddrError
from autotls.peerid import PeerId, PeerIdError

__all__ = ["DialBackError", "dial_back"]

log = logging.getLogger("autotls.node")


class DialBackError(Exception):
    """The dial-back failed. ``reason`` is the human summary ("no address answered",
    "peer id mismatch: expected X, got Y", "timeout after 15s", ...); ``failures`` maps each
    address that was tried or skipped to why it did not prove the peer."""

    def __init__(self, reason: str, failures: dict[str, str] | None = None) -> None:
        self.reason = reason
        self.failures: dict[str, str] = dict(failures or {})
        detail = "; ".join(f"{addr}: {why}" for addr, why in self.failures.items())
        super().__init__(f"{reason} ({detail})" if detail else reason)


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


# (the winning address, failures, peer id mismatches, timed out)
_Verdict = tuple[str | None, dict[str, str], dict[str, str], bool]


async def _dial_main(
    portal: Portal,
    peer_id: PeerId,
    plan: list[tuple[str, Multiaddr]],
    dial_seconds: float,
    tls_client_context: ssl.SSLContext | None,
) -> _Verdict:
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
        sec_opt=security_options(pair, with_tls=True),
        muxer_opt=muxer_options(),
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

    async with running(host, []), trio.open_nursery() as watch:
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
                            await swarm.dial_addr(py_multiaddr(target, for_dialing=True), expected)
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
        # The verdict is known: the caller has it now, while the host closes (py-libp2p's
        # close sleeps 0.2 s in yamux and the swarm connection; no caller should wait on it).
        portal.ready((winner, failures, mismatches, timed_out))
        watch.cancel_scope.cancel()
    return winner, failures, mismatches, timed_out


# The runs of successful dial-backs still closing their throw-away hosts.
_closing: set[asyncio.Future[Any]] = set()


async def dial_backs_closed(timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Wait until every successful :func:`dial_back` of this event loop has closed its
    throw-away host and its thread has ended (what a broker does when it stops)."""
    loop = asyncio.get_running_loop()
    pending = [f for f in _closing if not f.done() and f.get_loop() is loop]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


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
    returned at once, and the host is torn down in the background (py-libp2p's close takes
    0.2 s; :func:`dial_backs_closed` waits for it); a failure is raised once it is torn
    down. ``timeout`` bounds the dialing (15 s, the broker's dial timeout). Secure
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
    require_libp2p()

    async def main(portal: Portal) -> _Verdict:
        return await _dial_main(portal, peer_id, plan, timeout, tls_client_context)

    runner: TrioThread[_Verdict]
    runner = TrioThread(f"autotls-dial-back-{peer_id}")
    runner.launch(main)
    try:
        # ready: the verdict, reported before the throw-away host has closed; after a
        # success the thread closes it in the background and ends by itself.
        verdict = (await asyncio.shield(runner.ready)).unwrap()
        winner, failures, mismatches, timed_out = cast(_Verdict, verdict)
        if winner is None:  # a failure returns with every abandoned dial closed
            await asyncio.shield(runner.done)
        else:
            _closing.add(runner.done)
            runner.done.add_done_callback(_closing.discard)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await runner.finish(STOP_TIMEOUT)
        raise
    except Exception as exc:
        raise as_node_error(exc, "dial-back host failed") from exc
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
