"""PeerIds and identity keys against the published vectors (protocol.md §2, peer-ids spec)."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from pathlib import Path
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from autotls.fsm.errors import ConfigurationError, ErrorClass
from autotls.peerid import (
    KeyType,
    PeerId,
    PeerIdError,
    PrivateKey,
    PublicKey,
    b36decode,
    b36encode,
    b58decode,
    b58encode,
    key_file_exposed,
    load_private_key,
    load_private_key_async,
    save_private_key,
    uvarint_decode,
    uvarint_encode,
)
from tests.fixtures.components import component_missing

VECTORS = Path(__file__).parent / "vectors"
SPEC_KEYS = json.loads((VECTORS / "peerid_spec_keys.json").read_text())["vectors"]

# protocol.md §2: public key protobuf -> base58 -> base36 label
PROTOCOL_VECTORS = [
    (
        "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e",
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq",
        "k51qzi5uqu5dgy8qsq67hbz73jqkw87l3fgf4a91qb0d9b5173tir7n4vxk1oe",
    ),
    (
        "080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
        "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq",
        "k51qzi5uqu5djejcj9das04p3wen7mowcz0z5iq3tw0yxaa8ko01odjley7fdg",
    ),
    (
        "08011220098789a470adf9ea00f8dad3b98fc38ab14f9e58ba64c766d12178c0fbd79326",
        "12D3KooWATZi2wFwQxQ14Z3q24TDNWKap6f8W5ryLE6Da4RMfsxy",
        "k51qzi5uqu5dgf513xbrfjl4smgo2eh1x8p8y6grzsf1oz0reiy56p65tds3s6",
    ),
]


@pytest.mark.parametrize(("proto_hex", "b58", "b36"), PROTOCOL_VECTORS)
def test_protocol_vectors(proto_hex: str, b58: str, b36: str) -> None:
    pid = PeerId.from_public_key_proto(bytes.fromhex(proto_hex))
    assert pid.to_base58() == b58
    assert str(pid) == b58
    assert pid.to_base36() == b36
    assert len(b36) == 62
    assert PeerId.from_string(b58) == pid
    assert PeerId.from_string(b36) == pid
    assert PeerId.from_string(b36.upper().replace("K", "K", 1)) == pid  # base36 upper ("K…")
    assert hash(PeerId.from_string(b36)) == hash(pid)
    key = pid.public_key()
    assert key is not None and key.to_proto().hex() == proto_hex
    assert key.key_type is KeyType.ED25519


@pytest.mark.parametrize("vector", SPEC_KEYS, ids=[v["name"] for v in SPEC_KEYS])
def test_spec_key_vectors(vector: dict[str, str]) -> None:
    private_proto = bytes.fromhex(vector["private_key_proto"])
    public_proto = bytes.fromhex(vector["public_key_proto"])
    key = PrivateKey.from_proto(private_proto)
    # The spec: implementations SHOULD produce the provided public key from the private key.
    assert key.public_key.to_proto() == public_proto
    # and serialise the private key back byte for byte
    assert key.to_proto() == private_proto
    assert PublicKey.from_proto(public_proto).to_proto() == public_proto
    pid = key.peer_id
    assert pid == PeerId.from_public_key_proto(public_proto)
    assert pid.to_base58() == vector["peer_id_base58"]
    assert pid.to_base36() == vector["peer_id_base36"]
    assert PeerId.from_string(vector["peer_id_base36"]) == pid
    if len(public_proto) <= 42:
        assert pid.multihash[0] == 0x00 and pid.public_key() == key.public_key
    else:
        assert pid.multihash[:2] == b"\x12\x20" and pid.public_key() is None
        assert len(vector["peer_id_base36"]) == 56
    # signatures made with the vector key verify, and only over the signed data
    sig = key.sign(b"libp2p")
    assert key.public_key.verify(sig, b"libp2p")
    assert not key.public_key.verify(sig, b"libp2q")


def test_spec_string_examples() -> None:
    sha = PeerId.from_string("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    assert PeerId.from_string("bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe") == sha
    with pytest.raises(PeerIdError, match="CID version 18 is not 1"):  # z wants a CID
        PeerId.from_string("z" + sha.to_base58())
    assert PeerId.from_string("z" + b58encode(sha.to_cid_bytes())) == sha
    assert PeerId.from_string("f" + sha.to_cid_bytes().hex()) == sha
    assert sha.public_key() is None
    ed = PeerId.from_string("12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA")
    assert ed.public_key() is not None
    assert repr(ed) == "PeerId('12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA')"


def test_peer_id_is_hashable_and_comparable() -> None:
    a = PrivateKey.generate().peer_id
    b = PeerId.from_string(a.to_base36())
    assert a == b and {a, b} == {a}
    assert a != PrivateKey.generate().peer_id
    assert a != a.to_base58()


@pytest.mark.parametrize("key_type", list(KeyType))
def test_generate_round_trips(key_type: KeyType, tmp_path: Path) -> None:
    key = PrivateKey.generate(key_type)
    assert key.key_type is key_type
    again = PrivateKey.from_proto(key.to_proto())
    assert again == key and again.peer_id == key.peer_id
    assert PrivateKey.from_pem(key.to_pem()) == key
    assert key.to_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    for fmt in ("protobuf", "pem"):
        path = tmp_path / f"id.{fmt}"
        save_private_key(key, path, format=fmt)  # type: ignore[arg-type]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert load_private_key(path) == key
    pid = key.peer_id
    assert PeerId.from_string(str(pid)) == pid
    assert PeerId.from_string(pid.to_base36()) == pid
    assert PeerId.from_multihash(pid.multihash) == pid
    sig = key.sign(b"data")
    assert key.public_key.verify(sig, b"data")
    assert not key.public_key.verify(sig[:-1] + bytes([sig[-1] ^ 1]), b"data")
    assert not key.public_key.verify(b"", b"data")
    assert not PrivateKey.generate(key_type).public_key.verify(sig, b"data")


def test_identity_vs_sha256_rule() -> None:
    # Ed25519 (36 bytes) and secp256k1 (37 bytes) inline; RSA and ECDSA (> 42) are hashed.
    assert PrivateKey.generate(KeyType.ED25519).peer_id.to_base58().startswith("12D3KooW")
    assert PrivateKey.generate(KeyType.SECP256K1).peer_id.to_base58().startswith("16Uiu2")
    assert PrivateKey.generate(KeyType.ECDSA).peer_id.to_base58().startswith("Qm")
    assert PrivateKey.generate(KeyType.ED25519).peer_id.to_base36().startswith("k51qzi5uqu5d")
    assert PrivateKey.generate(KeyType.ECDSA).peer_id.to_base36().startswith("k2k4r8")


def test_rsa_sizes() -> None:
    with pytest.raises(PeerIdError, match="too small"):
        PrivateKey.generate(KeyType.RSA, bits=1024)
    with pytest.raises(PeerIdError, match="too large"):
        PrivateKey.generate(KeyType.RSA, bits=16384)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = small.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    proto = b"\x08\x00\x12" + uvarint_encode(len(der)) + der
    with pytest.raises(PeerIdError, match="1024 bits is too small"):
        PrivateKey.from_proto(proto)


def test_ed25519_private_forms() -> None:
    key = PrivateKey.generate()
    full = key.to_proto()
    assert len(full) == 4 + 64
    seed_only = key.to_proto(ed25519_seed_only=True)
    assert len(seed_only) == 4 + 32
    assert PrivateKey.from_proto(seed_only) == key
    data = full[4:]
    legacy = b"\x08\x01\x12\x60" + data + data[32:]
    assert PrivateKey.from_proto(legacy) == key
    other = PrivateKey.generate().public_key.raw
    with pytest.raises(PeerIdError, match="public half does not match"):
        PrivateKey.from_proto(b"\x08\x01\x12\x40" + data[:32] + other)
    with pytest.raises(PeerIdError, match="32, 64 or 96 bytes, got 33"):
        PrivateKey.from_proto(b"\x08\x01\x12\x21" + data[:33])


def test_repr_hides_key_material() -> None:
    for key_type in KeyType:
        key = PrivateKey.generate(key_type)
        text = repr(key) + str(key)
        assert str(key.peer_id) in text
        proto_hex = key.to_proto().hex()
        assert key.to_proto()[4:12].hex() not in text.lower()
        assert proto_hex not in text
        assert b"PRIVATE" not in text.encode()


def test_errors_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        PeerId.from_string("not a peer id")
    assert info.value.error_class is ErrorClass.PERMANENT


MALFORMED_PUBLIC = [
    (b"", "empty"),
    (bytes.fromhex("0801122001"), "truncated"),
    (bytes.fromhex("08011220") + b"\x01" * 31, "truncated"),
    (bytes.fromhex("0809") + b"\x12\x01\x00", "unknown key type 9"),
    (bytes.fromhex("1201") + b"\x00", "lacks KeyType"),
    (bytes.fromhex("0801"), "lacks Data"),
    (bytes.fromhex("08010801"), "repeats field 1"),
    (bytes.fromhex("0801120100"), "must be 32 bytes, got 1"),
    (bytes.fromhex("08011a0100"), "unexpected field 3"),
    (bytes.fromhex("0880"), "truncated varint"),
    (bytes.fromhex("0802120100"), r"33 \(compressed\) or 65 bytes"),
    (bytes.fromhex("08001203010203"), "invalid RSA public key"),
    (bytes.fromhex("08031203010203"), "invalid ECDSA public key"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED_PUBLIC)
def test_malformed_public_key_proto(data: bytes, message: str) -> None:
    with pytest.raises(PeerIdError, match=message):
        PublicKey.from_proto(data)


def test_ecdsa_key_bytes_as_rsa_are_rejected() -> None:
    ecdsa = PrivateKey.generate(KeyType.ECDSA).public_key.raw
    with pytest.raises(PeerIdError, match="not an RSA"):
        PublicKey.from_proto(b"\x08\x00\x12" + uvarint_encode(len(ecdsa)) + ecdsa)


def test_unsupported_ecdsa_curve() -> None:
    key = ec.generate_private_key(ec.SECP224R1())
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(PeerIdError, match="unsupported ECDSA curve"):
        PublicKey.from_proto(b"\x08\x03\x12" + uvarint_encode(len(der)) + der)


MALFORMED_TEXT = [
    ("", "empty PeerId"),
    ("12D3KooW0000", "invalid base58btc character '0'"),
    ("QmIIII", "invalid base58btc character 'I'"),
    ("k51qzi5uqu5d!", "invalid base36 character '!'"),
    ("xyz", "neither base58btc"),
    ("k", "empty CID"),
    # a CIDv1 with the dag-pb codec (0x70) instead of libp2p-key
    ("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", "codec 0x70 is not libp2p-key"),
    # a CIDv0-looking version byte
    ("f0072" + "1220" + "00" * 32, "CID version 0 is not 1"),
    ("f0172" + "1220" + "00" * 31, "found 31"),
    ("f0172" + "1320" + "00" * 32, "unsupported multihash code 0x13"),
    ("f0172" + "1210" + "00" * 16, "must carry 32 bytes"),
    ("f0172" + "0004" + "08011200", "must be 32 bytes"),
    ("1111", "malformed multihash"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED_TEXT)
def test_malformed_peer_id_text(text: str, message: str) -> None:
    with pytest.raises(PeerIdError, match=message):
        PeerId.from_string(text)


def test_malformed_private_key_proto() -> None:
    with pytest.raises(PeerIdError, match="secp256k1 private key must be a 32-byte scalar"):
        PrivateKey.from_proto(b"\x08\x02\x12\x02\x01\x02")
    with pytest.raises(PeerIdError, match="out of range"):
        PrivateKey.from_proto(b"\x08\x02\x12\x20" + b"\x00" * 32)
    with pytest.raises(PeerIdError, match="invalid RSA private key bytes"):
        PrivateKey.from_proto(b"\x08\x00\x12\x03\x01\x02\x03")
    with pytest.raises(PeerIdError, match="unknown key type 7"):
        PrivateKey.from_proto(b"\x08\x07\x12\x01\x00")
    rsa_proto = PrivateKey.generate(KeyType.ECDSA).to_proto()
    with pytest.raises(PeerIdError, match="not a PKCS#1 RSA key"):
        PrivateKey.from_proto(b"\x08\x00" + rsa_proto[2:])


def test_load_private_key_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(PeerIdError, match=f"{missing}: identity key file does not exist"):
        load_private_key(missing)
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    with pytest.raises(PeerIdError, match=f"{empty}: identity key file is empty"):
        load_private_key(empty)
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(PrivateKey.generate().to_proto()[:-5])
    with pytest.raises(PeerIdError, match=f"{corrupt}: private key protobuf is truncated"):
        load_private_key(corrupt)
    unknown = tmp_path / "unknown.key"
    unknown.write_bytes(b"\x08\x05\x12\x01\x00")
    with pytest.raises(PeerIdError, match=f"{unknown}: .*unknown key type 5"):
        load_private_key(unknown)
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PeerIdError, match=f"{bad_pem}: invalid PEM private key"):
        load_private_key(bad_pem)
    small = tmp_path / "small.pem"
    small.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(PeerIdError, match=f"{small}: RSA key of 1024 bits is too small"):
        load_private_key(small)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        PrivateKey.generate()
        .to_cryptography()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(PeerIdError, match=f"{encrypted}: PEM private key is encrypted"):
        load_private_key(encrypted)
    with pytest.raises(PeerIdError, match="is a directory"):
        load_private_key(tmp_path)


def test_load_traditional_pem(tmp_path: Path) -> None:
    key = PrivateKey.generate(KeyType.ECDSA)
    path = tmp_path / "ec.pem"
    path.write_bytes(
        key.to_cryptography().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    assert load_private_key(path) == key


def test_varint_rejects_bad_encodings() -> None:
    assert uvarint_encode(0) == b"\x00"
    assert uvarint_encode(300) == b"\xac\x02"
    assert uvarint_decode(b"\xac\x02") == (300, 2)
    with pytest.raises(PeerIdError, match="not minimally encoded"):
        uvarint_decode(b"\x81\x00")
    with pytest.raises(PeerIdError, match="truncated"):
        uvarint_decode(b"\x81")
    with pytest.raises(PeerIdError, match="longer than 9 bytes"):
        uvarint_decode(b"\xff" * 10 + b"\x01")
    with pytest.raises(PeerIdError, match="negative"):
        uvarint_encode(-1)


def test_parse_errors_are_value_errors_as_in_ipaddress() -> None:
    """Like ``ipaddress.ip_address('x')``, a malformed PeerId, key, varint or multiaddr raises
    a ValueError, which is also an AutoTLSError naming what is wrong."""
    from autotls.dnscheck import NameserverError, parse_nameserver
    from autotls.fsm.errors import AutoTLSError
    from autotls.multiaddrs import Multiaddr, MultiaddrError

    for attempt, kind in (
        (lambda: PeerId.from_string("12D3KooWnope"), PeerIdError),
        (lambda: uvarint_decode(b"\x81"), PeerIdError),
        (lambda: uvarint_encode(-1), PeerIdError),
        (lambda: Multiaddr.parse("/ip4/999.1.1.1/tcp/1"), MultiaddrError),
        (lambda: parse_nameserver("[::1"), NameserverError),
    ):
        with pytest.raises(kind) as raised:
            attempt()
        assert isinstance(raised.value, ValueError) and isinstance(raised.value, AutoTLSError)


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = uvarint_encode(value)
    assert uvarint_decode(encoded) == (value, len(encoded))
    assert uvarint_decode(encoded + b"\xff", 0) == (value, len(encoded))


@given(st.binary(max_size=80))
def test_base58_round_trip(data: bytes) -> None:
    text = b58encode(data)
    assert b58decode(text) == data
    assert text.startswith("1" * (len(data) - len(data.lstrip(b"\x00"))))


@given(st.binary(max_size=80))
def test_base36_round_trip(data: bytes) -> None:
    text = b36encode(data)
    assert set(text) <= set("0123456789abcdefghijklmnopqrstuvwxyz")
    assert b36decode(text) == data
    assert b36decode(text.upper()) == data


@given(st.binary(min_size=32, max_size=32))
def test_peer_id_text_round_trip_for_any_ed25519_point(seed: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = PrivateKey.from_cryptography(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    pid = key.peer_id
    assert PeerId.from_string(pid.to_base58()) == pid
    assert PeerId.from_string(pid.to_base36()) == pid
    assert len(pid.to_base36()) == 62


def test_cross_check_with_py_libp2p() -> None:
    """Our keys load in py-libp2p 0.8.1 and give the same PeerId, and the other way round."""
    try:
        from libp2p.crypto.ed25519 import create_new_key_pair
        from libp2p.crypto.serialization import deserialize_private_key, deserialize_public_key
        from libp2p.peer.id import ID
    except ImportError:
        component_missing("py-libp2p")

    # py-libp2p 0.8.1 has no ECDSA deserializer; it reads Ed25519 only in the 32-byte seed form.
    for key_type in (KeyType.ED25519, KeyType.SECP256K1, KeyType.RSA):
        ours = PrivateKey.generate(key_type)
        proto = ours.to_proto(ed25519_seed_only=key_type is KeyType.ED25519)
        theirs = deserialize_private_key(proto)
        assert ID.from_pubkey(theirs.get_public_key()).to_base58() == ours.peer_id.to_base58()
        their_pub = deserialize_public_key(ours.public_key.to_proto())
        assert their_pub.serialize() == ours.public_key.to_proto()
        # a signature made by py-libp2p verifies with our public key
        assert ours.public_key.verify(theirs.sign(b"cross"), b"cross")
        # and the PeerId text parses the same way on both sides
        assert ID.from_base58(str(ours.peer_id)).to_bytes() == ours.peer_id.multihash

    pair = create_new_key_pair()
    loaded = PrivateKey.from_proto(pair.private_key.serialize())
    assert str(loaded.peer_id) == ID.from_pubkey(pair.public_key).to_base58()


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/urandom", "fifo", "socket", "huge"])
def test_only_a_small_regular_file_is_read_as_a_key(special: str, tmp_path: Path) -> None:
    path = Path(special)
    if special == "fifo":
        path = tmp_path / "key.fifo"
        os.mkfifo(path)  # nobody writes: a blocking open would wait forever
    elif special == "socket":
        path = tmp_path / "key.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
    elif special == "huge":
        path = tmp_path / "key.pem"
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 20_000)
    # Refused from its metadata: not one byte of a device or FIFO is read. (Were it read, a
    # /dev/zero "key" would eat memory until the process died; the test would never end.)
    with pytest.raises(PeerIdError) as info:
        load_private_key(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    expected = {
        "/dev/zero": "character device",
        "/dev/urandom": "character device",
        "fifo": "a FIFO",
        "socket": "socket",
        "huge": "too large",
    }[special]
    assert expected in message


async def test_keys_load_off_the_event_loop(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "id.key"
    save_private_key(key, path)
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = PrivateKey.from_proto

    def spy(data: bytes) -> PrivateKey:
        seen.append(threading.get_ident())
        return original(data)

    with mock.patch.object(PrivateKey, "from_proto", staticmethod(spy)):
        assert await load_private_key_async(path) == key
    assert seen and seen[0] != loop_thread


def test_an_exposed_key_file_is_reported_and_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "id.key"
    save_private_key(key, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not key_file_exposed(path)
    path.chmod(0o640)
    assert key_file_exposed(path)
    with caplog.at_level(logging.WARNING, logger="autotls"):
        assert load_private_key(path) == key
    assert f"chmod 600 {path}" in caplog.text
    path.chmod(0o604)
    assert key_file_exposed(path)
