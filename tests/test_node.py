"""The py-libp2p node and the broker's dial-back, on real sockets with real py-libp2p.

Each test states a fact autotls/node.py relies on: our key gives the expected PeerId, the node
binds what it reports, the dial-back proves the PeerId (and refuses an impostor), the WSS
listener serves whatever its SSLContext holds *now* (live renewal), and start/stop leave no
thread or socket behind."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from autotls import dialback
from autotls.dialback import dial_backs_closed
from autotls.fsm.errors import ErrorClass
from autotls.multiaddrs import Multiaddr, MultiaddrError, forge_addresses
from autotls.node import DialBackError, Libp2pNode, NodeError, dial_back
from autotls.peerid import KeyType, PeerId, PrivateKey
from tests.fixtures.components import component_missing
from tests.fixtures.libp2p import RunningNode, client_context, server_context

pytestmark = [pytest.mark.libp2p, pytest.mark.usefixtures("libp2p_installed")]

LOOPBACK_LISTEN = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws"]


def _port(address: str) -> int:
    value = Multiaddr.parse(address).value("tcp")
    assert value is not None
    return int(value)


def _open_sockets() -> set[str]:
    """The inodes of this process's open sockets."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def _node_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("autotls-")]


async def _handshake(port: int, server_name: str, context: ssl.SSLContext) -> bytes:
    """A plain TLS handshake (no WebSocket, no libp2p) with SNI ``server_name``; the DER
    certificate the server presented."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_name, ssl_handshake_timeout=5
        ),
        timeout=10,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object is not None
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        # the server waits for a WebSocket upgrade and never answers a TLS close_notify
        writer.transport.abort()


def _leaf_der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode("ascii"))


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A TCP port whose kernel accepts connections that nobody ever answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"/ip4/127.0.0.1/tcp/{sock.getsockname()[1]}"
    finally:
        sock.close()


# ------------------------------------------------------------------------------ the node


async def test_node_runs_with_our_key_and_reports_bound_addresses(
    node_ca: trustme.CA,
) -> None:
    key = PrivateKey.generate(KeyType.ED25519)
    context = server_context(node_ca, f"*.{key.peer_id.to_base36()}.libp2p.direct")
    node = Libp2pNode(key, listen=LOOPBACK_LISTEN, tls_context=context)
    assert node.peer_id == key.peer_id
    assert node.listen_addresses == [] and not node.running

    async with node:
        assert node.running
        tcp, wss = node.listen_addresses
        assert tcp.startswith("/ip4/127.0.0.1/tcp/") and _port(tcp) > 0
        assert wss.startswith("/ip4/127.0.0.1/tcp/") and _port(wss) not in (0, _port(tcp))
        assert wss.endswith("/tls/sni/*.libp2p.direct/ws")
        # py-libp2p announces what it bound, the WSS listener as /wss, never a forge name
        assert node.announce_addresses == [tcp, f"/ip4/127.0.0.1/tcp/{_port(wss)}/wss"]
        # both are real listeners: something accepts TCP connections on each port
        for port in (_port(tcp), _port(wss)):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
        # the listen addresses are what the forge addresses are built from
        b36 = key.peer_id.to_base36()
        assert forge_addresses(node.listen_addresses, b36, forms=("short",)) == [
            f"/dns4/127-0-0-1.{b36}.libp2p.direct/tcp/{_port(wss)}/tls/ws"
        ]
    assert not node.running
    assert node.listen_addresses == [] and node.announce_addresses == []


async def test_dial_back_proves_the_peer_id(libp2p_node: RunningNode) -> None:
    worked = await dial_back(libp2p_node.key.peer_id, [libp2p_node.tcp_address], timeout=10)
    assert worked == libp2p_node.tcp_address


async def test_dial_back_answers_before_its_host_has_closed(
    libp2p_node: RunningNode,
) -> None:
    """As a go-libp2p broker does: the answer comes when the dial is over; the throw-away
    host closes afterwards, and dial_backs_closed() waits for it and its thread. A failure
    returns only once every dial is closed."""
    peer = libp2p_node.key.peer_id
    await dial_backs_closed()  # an earlier test's dial-back may still be closing
    before = set(dialback._closing)
    worked = await dial_back(peer, [libp2p_node.tcp_address], timeout=10)
    assert worked == libp2p_node.tcp_address
    (closing,) = dialback._closing - before
    assert not closing.done()  # returned before the host's close was even waited for
    await dial_backs_closed()
    assert closing.done() and closing not in dialback._closing
    assert not [t for t in threading.enumerate() if t.name.startswith("autotls-dial-back-")]
    with pytest.raises(DialBackError, match="peer id mismatch"):
        await dial_back(PrivateKey.generate().peer_id, [libp2p_node.tcp_address], timeout=10)
    assert not dialback._closing - before  # a failure returns with its host closed
    assert not [t for t in threading.enumerate() if t.name.startswith("autotls-dial-back-")]


async def test_dial_back_accepts_a_matching_p2p_suffix_and_returns_the_address_as_given(
    libp2p_node: RunningNode,
) -> None:
    peer = libp2p_node.key.peer_id
    given = f"{libp2p_node.tcp_address}/p2p/{peer.to_base58()}"
    assert await dial_back(peer, ["/ip4/127.0.0.1/tcp/1", given], timeout=10) == given


async def test_dial_back_refuses_another_peer(libp2p_node: RunningNode) -> None:
    expected = PrivateKey.generate(KeyType.ED25519).peer_id
    with pytest.raises(DialBackError) as info:
        await dial_back(expected, [libp2p_node.tcp_address], timeout=10)
    actual = libp2p_node.key.peer_id.to_base58()
    assert info.value.reason == f"peer id mismatch: expected {expected.to_base58()}, got {actual}"
    assert info.value.failures == {libp2p_node.tcp_address: f"peer id mismatch: {actual}"}


async def test_dial_back_with_nothing_listening(libp2p_node: RunningNode) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()
    address = f"/ip4/127.0.0.1/tcp/{closed_port}"
    started = time.monotonic()
    with pytest.raises(DialBackError) as info:
        await dial_back(libp2p_node.key.peer_id, [address], timeout=5)
    assert time.monotonic() - started < 5
    assert info.value.reason == "no address answered"
    assert info.value.failures == {address: "connection refused"}


async def test_dial_back_times_out_on_a_silent_listener(
    libp2p_node: RunningNode, silent_listener: str
) -> None:
    sockets_before = _open_sockets()
    started = time.monotonic()
    with pytest.raises(DialBackError) as info:
        await dial_back(libp2p_node.key.peer_id, [silent_listener], timeout=0.5)
    assert time.monotonic() - started < 5  # the 0.5 s budget plus host start/teardown
    assert info.value.reason == "timeout after 0.5s"
    assert _open_sockets() <= sockets_before  # the abandoned dial was closed


async def test_dial_back_finds_the_one_good_address_among_bad_ones(
    libp2p_node: RunningNode, silent_listener: str
) -> None:
    addresses = [
        "/ip4/127.0.0.1/tcp/1",
        silent_listener,
        "/ip4/127.0.0.1/udp/4001/quic-v1",
        libp2p_node.tcp_address,
    ]
    assert (
        await dial_back(libp2p_node.key.peer_id, addresses, timeout=10) == libp2p_node.tcp_address
    )


@pytest.mark.parametrize("form", ["/tls/sni/*.libp2p.direct/ws", "/tls/ws", "/wss"])
async def test_dial_back_over_secure_websockets(node_ca: trustme.CA, form: str) -> None:
    key = PrivateKey.generate(KeyType.ED25519)
    context = server_context(node_ca, f"*.{key.peer_id.to_base36()}.libp2p.direct")
    async with Libp2pNode(key, listen=[f"/ip4/127.0.0.1/tcp/0{form}"], tls_context=context) as node:
        (wss,) = node.listen_addresses
        assert wss.endswith(form) and _port(wss) > 0
        trusting = client_context(node_ca)
        # py-libp2p verifies the certificate against the dialed host (127.0.0.1), not /sni/:
        # a forge certificate fails that check, as it would before the cert is issued.
        with pytest.raises(DialBackError) as info:
            await dial_back(key.peer_id, [wss], timeout=10, tls_client_context=trusting)
        assert info.value.reason == "no address answered"
        assert "certificate verify failed" in info.value.failures[wss]

        trusting.check_hostname = False
        assert await dial_back(key.peer_id, [wss], timeout=10, tls_client_context=trusting) == wss


async def test_dial_back_skips_what_it_cannot_dial() -> None:
    peer = PrivateKey.generate(KeyType.ED25519).peer_id
    other = PrivateKey.generate(KeyType.ED25519).peer_id.to_base58()
    addresses = [
        "/ip4/1.2.3.4/udp/4001/quic-v1",
        f"/ip4/1.2.3.4/tcp/4001/p2p/{other}",
        f"/ip4/1.2.3.4/tcp/4001/p2p/{other}/p2p-circuit/p2p/{peer.to_base58()}",
        "/ip4/1.2.3.4/tcp/0",
    ]
    with pytest.raises(DialBackError) as info:
        await dial_back(peer, addresses, timeout=1)
    assert info.value.reason == "no dialable address"
    assert info.value.failures == {
        addresses[0]: "unsupported transport (this dialer speaks TCP and WebSockets)",
        addresses[1]: f"names another peer ({other})",
        addresses[2]: "relay addresses are not dialed",
        addresses[3]: "port 0",
    }


async def test_dial_back_rejects_malformed_addresses() -> None:
    peer = PrivateKey.generate(KeyType.ED25519).peer_id
    with pytest.raises(DialBackError, match=r"malformed address: .*out of range"):
        await dial_back(peer, ["/ip4/127.0.0.1/tcp/99999"])
    with pytest.raises(DialBackError, match="sequence of multiaddr strings"):
        await dial_back(peer, "/ip4/127.0.0.1/tcp/4001")
    with pytest.raises(DialBackError, match="timeout must be positive"):
        await dial_back(peer, ["/ip4/127.0.0.1/tcp/4001"], timeout=0)


# ---------------------------------------------------------- the secure WebSocket listener


async def test_wss_listener_serves_the_context_and_picks_up_a_reloaded_chain(
    node_ca: trustme.CA,
) -> None:
    key = PrivateKey.generate(KeyType.ED25519)
    b36 = key.peer_id.to_base36()
    first = node_ca.issue_cert(f"*.{b36}.libp2p.direct")
    second = node_ca.issue_cert(f"*.{b36}.libp2p.direct")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    first.configure_cert(context)
    verify = client_context(node_ca)
    sni = f"1-2-3-4.{b36}.libp2p.direct"

    async with Libp2pNode(key, listen=LOOPBACK_LISTEN, tls_context=context) as node:
        port = _port(node.listen_addresses[1])
        assert await _handshake(port, sni, verify) == _leaf_der(first)
        # what the installer does on renewal: load the new chain into the same context
        second.configure_cert(context)  # = context.load_cert_chain(...)
        assert await _handshake(port, sni, verify) == _leaf_der(second)
        # and the libp2p connection over WSS still works with the new certificate
        verify.check_hostname = False
        assert (
            await dial_back(
                key.peer_id, [node.listen_addresses[1]], timeout=10, tls_client_context=verify
            )
            == node.listen_addresses[1]
        )


async def test_wss_listener_starts_without_a_certificate_but_cannot_handshake(
    node_ca: trustme.CA,
) -> None:
    key = PrivateKey.generate(KeyType.ED25519)
    b36 = key.peer_id.to_base36()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # nothing loaded yet
    verify = client_context(node_ca)
    sni = f"1-2-3-4.{b36}.libp2p.direct"

    async with Libp2pNode(key, listen=LOOPBACK_LISTEN, tls_context=context) as node:
        port = _port(node.listen_addresses[1])
        with pytest.raises((OSError, TimeoutError, ssl.SSLError)):
            await asyncio.wait_for(_handshake(port, sni, verify), timeout=1)
        # hence the installer's placeholder: once a chain is loaded, handshakes work
        leaf = node_ca.issue_cert(f"*.{b36}.libp2p.direct")
        leaf.configure_cert(context)
        assert await _handshake(port, sni, verify) == _leaf_der(leaf)


# ------------------------------------------------------------------------------ lifecycle


async def test_start_stop_twice_leaves_no_thread_or_socket_behind(node_ca: trustme.CA) -> None:
    key = PrivateKey.generate(KeyType.ED25519)
    context = server_context(node_ca, f"*.{key.peer_id.to_base36()}.libp2p.direct")
    node = Libp2pNode(key, listen=LOOPBACK_LISTEN, tls_context=context)
    # warm up py-libp2p's import and the loop's own sockets before taking the baseline, and
    # let the garbage collector close what earlier tests' peers left behind
    await node.start()
    await node.stop()
    gc.collect()
    threads_before = set(threading.enumerate())
    sockets_before = _open_sockets()

    ports = []
    for _ in range(2):
        await node.start()
        assert len(_node_threads()) == 1
        ports.append(tuple(_port(a) for a in node.listen_addresses))
        assert await dial_back(key.peer_id, node.listen_addresses[:1], timeout=10)
        await dial_backs_closed()  # its throw-away host closes after the verdict
        await node.stop()
        await node.stop()  # idempotent
        assert set(threading.enumerate()) == threads_before
        assert _open_sockets() <= sockets_before  # without help from the garbage collector
    # the listeners are really gone: listening on their ports again works (SO_REUSEADDR
    # only forgives TIME_WAIT leftovers of closed connections, never a live listener)
    for port in ports[-1]:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen(1)


async def test_start_twice_is_refused(libp2p_node: RunningNode) -> None:
    with pytest.raises(NodeError, match="already started"):
        await libp2p_node.node.start()


async def test_a_port_in_use_fails_start_and_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"
        threads_before = set(threading.enumerate())
        node = Libp2pNode(PrivateKey.generate(), listen=["/ip4/127.0.0.1/tcp/0", address])
        with pytest.raises(NodeError, match=f"could not listen on {address}"):
            await node.start()
        assert not node.running
        assert set(threading.enumerate()) == threads_before


async def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        component_missing("IPv6 loopback (::1)")
    key = PrivateKey.generate(KeyType.ED25519)
    async with Libp2pNode(key, listen=["/ip6/::1/tcp/0"]) as node:
        (address,) = node.listen_addresses
        assert address.startswith("/ip6/::1/tcp/")
        assert await dial_back(key.peer_id, [address], timeout=10) == address


# -------------------------------------------- what a foreign py-libp2p peer sees of the node


def _as_py_libp2p_peer(
    address: str, peer: PeerId, *, security: str, muxer: str, identify: bool
) -> object:
    """Dial the node from a plain py-libp2p host (its own trio.run, in this worker thread)
    offering only ``security`` and ``muxer``; with ``identify`` return the node's identify
    message, else ``None`` once connected."""
    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.custom_types import TProtocol
    from libp2p.identity.identify.identify import ID as IDENTIFY
    from libp2p.identity.identify.identify import parse_identify_response
    from libp2p.peer.id import ID
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux
    from libp2p.utils.varint import read_length_prefixed_protobuf

    pair = create_new_key_pair()
    securities: dict[str, Any] = {
        "noise": {
            TProtocol(NOISE_ID): NoiseTransport(pair, noise_privkey=new_x25519().private_key)
        },
        "plaintext": {TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(pair)},
    }
    muxers: dict[str, Any] = {
        "yamux": {TProtocol(YAMUX_ID): Yamux},
        "mplex": {TProtocol(MPLEX_PROTOCOL_ID): Mplex},
    }

    async def main() -> object:
        host = new_host(key_pair=pair, sec_opt=securities[security], muxer_opt=muxers[muxer])
        remote = ID(peer.multihash)
        async with host.run([]):
            try:
                with trio.fail_after(10):
                    await host.get_network().dial_addr(multiaddr.Multiaddr(address), remote)
                    if not identify:
                        return None
                    stream = await host.new_stream(remote, [IDENTIFY])
                    return parse_identify_response(await read_length_prefixed_protobuf(stream))
            finally:
                await host.close()

    return trio.run(main)


async def test_the_node_answers_identify(libp2p_node: RunningNode) -> None:
    message: Any = await asyncio.to_thread(
        _as_py_libp2p_peer,
        libp2p_node.tcp_address,
        libp2p_node.key.peer_id,
        security="noise",
        muxer="yamux",
        identify=True,
    )
    assert bytes(message.public_key) == libp2p_node.key.public_key.to_proto()
    assert "/ipfs/id/1.0.0" in message.protocols
    import multiaddr

    announced = {str(multiaddr.Multiaddr(raw)) for raw in message.listen_addrs}
    assert libp2p_node.tcp_address in announced


def _messages(exc: BaseException) -> str:
    """Every message in an exception, its groups and its causes."""
    parts = [f"{type(exc).__name__}: {exc}"]
    if isinstance(exc, BaseExceptionGroup):
        parts += [_messages(inner) for inner in exc.exceptions]
    if exc.__cause__ is not None:
        parts.append(_messages(exc.__cause__))
    return " | ".join(parts)


@pytest.mark.parametrize(
    ("security", "muxer", "refusal"),
    [
        ("plaintext", "yamux", "failed to upgrade security"),
        ("noise", "mplex", "failed to upgrade mux"),
    ],
    ids=["plaintext", "mplex"],
)
async def test_the_node_refuses_plaintext_and_mplex(
    libp2p_node: RunningNode, security: str, muxer: str, refusal: str
) -> None:
    with pytest.raises(BaseException) as info:  # py-libp2p's own error types, in groups
        await asyncio.to_thread(
            _as_py_libp2p_peer,
            libp2p_node.tcp_address,
            libp2p_node.key.peer_id,
            security=security,
            muxer=muxer,
            identify=False,
        )
    assert refusal in _messages(info.value)


# ------------------------------------------------------------------------------ key types


@pytest.mark.parametrize("key_type", [KeyType.ED25519, KeyType.SECP256K1, KeyType.RSA])
async def test_node_keys_of_every_type_py_libp2p_supports(key_type: KeyType) -> None:
    key = PrivateKey.generate(key_type)
    async with Libp2pNode(key, listen=["/ip4/127.0.0.1/tcp/0"]) as node:
        assert node.peer_id == key.peer_id
        (address,) = node.listen_addresses
        assert await dial_back(key.peer_id, [address], timeout=10) == address
    with pytest.raises(DialBackError, match="peer id mismatch"):
        async with Libp2pNode(key, listen=["/ip4/127.0.0.1/tcp/0"]) as node:
            await dial_back(PrivateKey.generate().peer_id, node.listen_addresses, timeout=10)


def test_ecdsa_keys_are_refused_because_py_libp2p_cannot_load_them() -> None:
    with pytest.raises(NodeError, match="cannot load ECDSA") as info:
        Libp2pNode(PrivateKey.generate(KeyType.ECDSA), listen=["/ip4/127.0.0.1/tcp/0"])
    assert info.value.error_class is ErrorClass.PERMANENT


# ------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("listen", "with_tls", "problem"),
    [
        (["/ip4/127.0.0.1/udp/0/quic-v1"], False, "unsupported listen address"),
        (["/dns4/localhost/tcp/0"], False, "unsupported listen address"),
        (["/ip4/127.0.0.1/tcp/0/tls/ws"], False, "no tls_context was given"),
        (["/ip4/127.0.0.1/tcp/0/ws"], True, "would serve with TLS"),
        (["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/tls/ws"], True, "share a port"),
        ([], False, "at least one listen address"),
        ("/ip4/127.0.0.1/tcp/0", False, "not one string"),
    ],
)
def test_bad_listen_configurations(
    listen: list[str], with_tls: bool, problem: str, node_ca: trustme.CA
) -> None:
    context = server_context(node_ca, "node.test") if with_tls else None
    with pytest.raises(NodeError, match=problem):
        Libp2pNode(PrivateKey.generate(), listen=listen, tls_context=context)


def test_malformed_listen_address() -> None:
    with pytest.raises(MultiaddrError, match="bad port"):
        Libp2pNode(PrivateKey.generate(), listen=["/ip4/127.0.0.1/tcp/x"])


async def test_plain_websocket_listener_and_dial_back_over_it() -> None:
    key = PrivateKey.generate(KeyType.ED25519)
    async with Libp2pNode(key, listen=["/ip4/127.0.0.1/tcp/0/ws"]) as node:
        (address,) = node.listen_addresses
        assert address.endswith("/ws") and _port(address) > 0
        assert await dial_back(key.peer_id, [address], timeout=10) == address


def _ask_py_libp2p_autonat_about(address: str) -> tuple[int, str | None]:
    """A py-libp2p AutoNAT v1 server and a client asking it to dial ``address`` (each host
    on loopback, in one trio.run in this worker thread): the server's verdict."""
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.host.autonat import AutoNATService
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr as PyMultiaddr

    from autotls.libp2p_host import muxer_options, running, security_options

    def host() -> Any:
        pair = create_new_key_pair()
        options = security_options(pair, with_tls=False)
        return new_host(key_pair=pair, sec_opt=options, muxer_opt=muxer_options())

    async def main() -> tuple[int, str | None]:
        server, client = host(), host()
        loopback = [PyMultiaddr("/ip4/127.0.0.1/tcp/0")]
        async with running(server, loopback), running(client, loopback):
            AutoNATService(server, serve=True)
            asking = AutoNATService(client, serve=False, confirmations=1)
            with trio.fail_after(10):
                await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
                status, dialed = await asking.query_server(
                    server.get_id(), addrs=[PyMultiaddr(address).to_bytes()]
                )
        return status, str(PyMultiaddr(dialed)) if dialed else None

    return trio.run(main)


async def test_py_libp2p_autonat_confirms_an_address_nobody_listens_on() -> None:
    """Why autotls does not confirm reachability with py-libp2p's AutoNAT (autotls/node.py,
    "AutoNAT"): its server answers OK, and names the address as dialed, for a port nothing
    listens on -- it reuses the connection the request came over instead of dialing. When
    this fails, py-libp2p's server dials for real and AutoNAT is worth a second look."""
    from libp2p.host.autonat.pb.autonat_pb2 import Message

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"/ip4/127.0.0.1/tcp/{sock.getsockname()[1]}"
    status, dialed = await asyncio.to_thread(_ask_py_libp2p_autonat_about, closed)
    assert status == Message.OK
    assert dialed == closed
