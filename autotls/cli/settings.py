"""Settings validation: where the data directory and the database are, and everything
``autotls run`` needs, checked before anything starts.

:func:`node_settings` is the one place a ``run`` option is validated (after
:mod:`autotls.cli.options` has read it from the flag or its environment variable): a bad
value stops the command with a one-line :class:`UsageError` that names the flag or variable
it came from, before a key is generated or a database created. New ``run`` checks go here.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from autotls.cli.exits import UsageError
from autotls.cli.options import source
from autotls.fsm.errors import ConfigurationError
from autotls.persistence.errors import DatabaseURLError

if TYPE_CHECKING:
    from cryptography import x509

    from autotls.acme import ExternalAccountBinding

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/tcp/4002/tls/sni/*.libp2p.direct/ws")
IDENTITY_FILE = "identity.key"
DEFAULT_DEADLINE = timedelta(minutes=10)
DEFAULT_STORE_POLL = timedelta(seconds=30)
LOG_FORMATS = ("human", "json")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, *, allow_zero: bool = False) -> timedelta:
    """``90s``, ``10m``, ``1h30m``, ``500ms``, ``2d`` (Go's notation, as Kubo's config takes
    it, plus days), or a bare number of seconds; ``0`` only with ``allow_zero``. Raises
    ValueError naming what is wrong."""
    raw = text.strip().lower()
    if not raw:
        raise ValueError("empty duration")
    try:
        seconds = float(raw)
    except ValueError:
        position, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(raw):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            position = match.end()
        if position != len(raw) or position == 0:
            raise ValueError(
                f"{text!r} is not a duration (e.g. 90s, 10m, 1h30m, or seconds)"
            ) from None
    low_ok = seconds >= 0 if allow_zero else seconds > 0
    if not (low_ok and seconds < 10 * 365 * 86400):  # also refuses nan and inf
        what = "not be negative" if allow_zero else "be positive"
        raise ValueError(f"{text!r}: a duration must {what} (and under ten years)")
    return timedelta(seconds=seconds)


def duration(args: argparse.Namespace, dest: str, default: timedelta) -> timedelta:
    value = getattr(args, dest, None)
    if value is None:
        return default
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise UsageError(f"{source(args, dest)}: {exc}") from None


def log_format(args: argparse.Namespace) -> str:
    """``--log-format`` (``human`` unless given); only ``run`` has the option."""
    value = getattr(args, "log_format", None)
    if value is None:
        return "human"
    chosen = str(value).strip().lower()
    if chosen not in LOG_FORMATS:
        raise UsageError(
            f"{source(args, 'log_format')}: {value!r} is not a log format (human or json)"
        )
    return chosen


def registration_delay(args: argparse.Namespace) -> timedelta:
    """``--registration-delay`` (0 unless given)."""
    value = getattr(args, "registration_delay", None)
    if value is None:
        return timedelta(0)
    try:
        return parse_duration(str(value), allow_zero=True)
    except ValueError as exc:
        raise UsageError(f"{source(args, 'registration_delay')}: {exc}") from None


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME", "").strip()
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "autotls"


def data_dir(args: argparse.Namespace) -> Path:
    text = getattr(args, "data_dir", None)
    return Path(text).expanduser() if text else default_data_dir()


def database_url(args: argparse.Namespace) -> str:
    """``--db`` as given (once it parses), else the SQLite file in the data directory."""
    from autotls.persistence.urls import DATABASE_FILE, parse_database_url

    text = getattr(args, "db", None)
    if text:
        try:
            parse_database_url(text)
        except DatabaseURLError as exc:
            raise UsageError(f"{source(args, 'db')}: {exc}") from None
        return str(text)
    return f"sqlite:///{data_dir(args) / DATABASE_FILE}"


@dataclass
class NodeSettings:
    """Everything ``autotls run`` needs, validated before anything starts."""

    data_dir: Path
    key_path: Path
    database_url: str
    listen: list[str]
    announce: list[str] | None
    directory_url: str
    ca_file: str | None
    trust_roots: list[x509.Certificate] | None
    broker_url: str
    broker_ca_file: str | None
    dns_servers: list[str] | None
    allow_private_addresses: bool
    profile: str | None
    eab: ExternalAccountBinding | None
    contact: list[str]
    preferred_chain: str | None
    forge_auth: str | None = field(repr=False)
    once: bool
    deadline: timedelta = DEFAULT_DEADLINE  # with once: from start to the last useful attempt
    store_poll: timedelta = DEFAULT_STORE_POLL
    registration_delay: timedelta = timedelta(0)
    metrics_listen: ListenAddress | None = None
    record: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ListenAddress:
    """Where ``--metrics-listen`` serves: ``host`` None is every interface; port 0 is one
    the system picks. ``given_by`` names the flag or variable, for error lines."""

    host: str | None
    port: int
    given_by: str

    def __str__(self) -> str:
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def listen_address(args: argparse.Namespace, dest: str, value: str) -> ListenAddress:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface)."""
    given_by = source(args, dest)

    def bad(why: str) -> UsageError:
        return UsageError(
            f"{given_by}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464, "
            f":9464): {why}"
        )

    text = value.strip()
    if "://" in text:
        raise bad("give the address, not a URL")
    host_text, colon, port_text = text.rpartition(":")
    if not colon:
        raise bad("no port")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise bad(f"bad port {port_text!r}")
    host: str | None
    if host_text.startswith("[") and host_text.endswith("]"):
        host = host_text[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    elif ":" in host_text:
        raise bad("an IPv6 address goes in brackets")
    elif not host_text:
        host = None
    else:
        host = host_text
        if all(part.isdigit() for part in host.split(".")):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad(f"{host!r} is not an IPv4 address") from None
        elif not _HOSTNAME.match(host):
            raise bad(f"{host!r} is not a host name or address")
    return ListenAddress(host, int(port_text), given_by)


def check_url(args: argparse.Namespace, dest: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{source(args, dest)}: {value!r} is not an http(s) URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise UsageError(f"{source(args, dest)}: {value!r} has a bad port") from None
    return value


def check_ca_file(args: argparse.Namespace, dest: str, value: str | None) -> str | None:
    import ssl

    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(
            f"{source(args, dest)}: cannot use {path} as a CA file: {reason}"
        ) from None
    return str(path)


def _multiaddrs(args: argparse.Namespace, dest: str, values: Sequence[str]) -> list[str]:
    from autotls.multiaddrs import Multiaddr, MultiaddrError

    out = []
    for value in values:
        try:
            out.append(str(Multiaddr.parse(value)))
        except MultiaddrError as exc:
            raise UsageError(f"{source(args, dest)}: {exc}") from None
    return out


def node_settings(args: argparse.Namespace) -> NodeSettings:
    """Validate every ``run`` option (flags, then environment, then defaults)."""
    from autotls.acme import AcmeInputError, ExternalAccountBinding
    from autotls.adapters import LETS_ENCRYPT, LETS_ENCRYPT_STAGING
    from autotls.broker import DEFAULT_BROKER_URL
    from autotls.dnscheck import parse_nameserver
    from autotls.install import load_trust_roots

    notes: list[str] = []
    directory = data_dir(args)
    key_path = Path(args.key).expanduser() if args.key else directory / IDENTITY_FILE
    database = database_url(args)

    if args.staging and args.ca:
        raise UsageError(
            f"{source(args, 'staging')} and {source(args, 'ca')} both choose the ACME "
            "directory: give one"
        )
    if args.ca:
        directory_url = check_url(args, "ca", args.ca)
    else:
        directory_url = LETS_ENCRYPT_STAGING if args.staging else LETS_ENCRYPT

    trust_roots: list[x509.Certificate] | None = None
    if args.trust_roots:
        try:
            trust_roots = load_trust_roots(Path(args.trust_roots).expanduser())
        except ConfigurationError as exc:
            raise UsageError(f"{source(args, 'trust_roots')}: {exc}") from None
        if not trust_roots:
            raise UsageError(f"{source(args, 'trust_roots')}: no certificate in the file")
    elif args.staging:
        # Staging chains end in "(STAGING)" roots that no system bundle holds: without them
        # every issued chain would be rejected as untrusted.
        trust_roots = []
        notes.append(
            "staging: issued chains are checked for consistency only; give --trust-roots "
            "with Let's Encrypt's staging roots to verify them fully"
        )

    dns_servers = None
    if args.dns_server:
        for server in args.dns_server:
            try:
                parse_nameserver(server)
            except ConfigurationError as exc:
                raise UsageError(f"{source(args, 'dns_server')}: {exc}") from None
        dns_servers = list(args.dns_server)

    eab = None
    if bool(args.eab_kid) != bool(args.eab_hmac_key):
        raise UsageError("External Account Binding needs both --eab-kid and --eab-hmac-key")
    if args.eab_kid and args.eab_hmac_key:
        try:
            eab = ExternalAccountBinding.from_base64url(args.eab_kid, args.eab_hmac_key)
        except AcmeInputError as exc:
            raise UsageError(f"{source(args, 'eab_hmac_key')}: {exc}") from None

    contact = list(args.contact or [])
    for item in contact:
        if not item.startswith("mailto:") or "@" not in item:
            raise UsageError(
                f"{source(args, 'contact')}: {item!r} is not a mailto: address "
                "(mailto:you@example.org)"
            )

    once = bool(args.once)
    deadline = duration(args, "deadline", DEFAULT_DEADLINE)
    # The variable may sit in an environment shared with a service; the flag is a mistake.
    if args.deadline is not None and not once and source(args, "deadline") == "--deadline":
        raise UsageError(
            f"{source(args, 'deadline')} applies to --once only (a running node never gives up)"
        )
    store_poll = duration(args, "store_poll", DEFAULT_STORE_POLL)

    listen = _multiaddrs(args, "listen", args.listen or DEFAULT_LISTEN)
    announce = _multiaddrs(args, "announce", args.announce) if args.announce else None
    return NodeSettings(
        data_dir=directory,
        key_path=key_path,
        database_url=database,
        listen=listen,
        announce=announce,
        directory_url=directory_url,
        ca_file=check_ca_file(args, "ca_bundle", args.ca_bundle),
        trust_roots=trust_roots,
        broker_url=check_url(args, "broker", args.broker or DEFAULT_BROKER_URL),
        broker_ca_file=check_ca_file(args, "broker_ca_bundle", args.broker_ca_bundle),
        dns_servers=dns_servers,
        allow_private_addresses=bool(args.allow_private_addresses),
        profile=args.profile or None,
        eab=eab,
        contact=contact,
        preferred_chain=args.preferred_chain or None,
        forge_auth=args.forge_auth or None,
        once=once,
        deadline=deadline,
        store_poll=store_poll,
        registration_delay=registration_delay(args),
        metrics_listen=listen_address(args, "metrics_listen", args.metrics_listen)
        if args.metrics_listen
        else None,
        record=record_directory(args, args.record) if args.record else None,
        notes=notes,
    )


def record_directory(args: argparse.Namespace, value: str) -> Path:
    """``--record DIR``: a directory (made on start if missing), not a file."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{source(args, 'record')}: {path} is not a directory")
    return path


def secret_values(args: argparse.Namespace) -> list[str]:
    """Values that must never reach the terminal, even inside a library's message."""
    found = [
        value
        for value in (getattr(args, "eab_hmac_key", None), getattr(args, "forge_auth", None))
        if value
    ]
    db = getattr(args, "db", None)
    if db and "://" in db:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        with contextlib.suppress(ArgumentError, ValueError):
            password = make_url(db).password
            if password:
                found.append(str(password))
    return found
