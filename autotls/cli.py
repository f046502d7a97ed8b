"""The ``autotls`` command line: run a node, look at and act on the orders it keeps.

::

    autotls demo [--json]                 issue on the local stack and prove it with TLS
    autotls run [--once] [options]        a py-libp2p node that keeps its certificate
    autotls status [--json]               every order in the database
    autotls diagram [--order ID]          the machine, or one order's path through it
    autotls db upgrade | db current       schema migrations
    autotls renew --force [--order ID]    renew an Installed order now
    autotls retry --order ID              start a Failed order over
    autotls revoke [--order ID]           revoke the current certificate, then renew
    autotls account show [--json]         the stored ACME accounts (never their keys)

This module owns the process boundary: arguments and their environment variables, exit
codes, what reaches stdout (results) and stderr (progress, warnings, the one-line error),
signals and logging. Everything it does goes through the public pieces (:class:`AutoTLS`,
:class:`autotls.persistence.store.Store`, :mod:`autotls.fsm.operator`, :mod:`autotls.fsm.diagrams`).

Exit codes (stable; scripts may rely on them):

* ``0`` success;
* ``1`` the issuance or operation failed (permanent failure, demo or TLS check failed, the
  CA refused, the order is not in a state the action needs);
* ``2`` usage or configuration error (bad arguments or environment variables, a malformed,
  unreadable or corrupt key file, a bad URL, multiaddr or DNS server, an unknown order id);
* ``3`` database problem (missing, unusable, or its schema needs ``db upgrade`` or is newer
  than this autotls);
* ``130`` interrupted (SIGINT; SIGTERM too, except for ``run`` without ``--once``, where
  SIGTERM is the normal way to stop and exits 0 once node, worker and store are closed).

Every ``run`` option has an environment variable ``AUTOTLS_<OPTION>`` (``--dns-server`` ->
``AUTOTLS_DNS_SERVER``; lists separated by spaces or commas; switches take 1/0, true/false,
yes/no, on/off); a flag on the command line wins over its variable. Errors are one line,
``autotls: error: ...``; ``--verbose`` adds the traceback and debug logs. Secrets (keys,
the EAB HMAC key, the forge token, database passwords) are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import traceback
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import urlsplit

from autotls.fsm.errors import AutoTLSError, ConfigurationError, ErrorClass
from autotls.persistence.errors import (
    ActiveOrderExistsError,
    DatabaseURLError,
    OrderBusyError,
    OrderNotFoundError,
    StoreError,
)

if TYPE_CHECKING:
    from cryptography import x509

    from autotls.acme import ExternalAccountBinding
    from autotls.fsm.worker import OrderEvent
    from autotls.peerid import PrivateKey
    from autotls.persistence.records import OrderSnapshot
    from autotls.persistence.store import CorruptOrder, Store
    from autotls.service import AutoTLS, CertificateInfo, Failure

PROG = "autotls"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EXIT_INTERRUPTED = 130

ENV_PREFIX = "AUTOTLS_"
DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/tcp/4002/tls/sni/*.libp2p.direct/ws")
IDENTITY_FILE = "identity.key"
# A worker notices operator changes made by another process at its next poll.
WORKER_POLL_S = 30

# RFC 5280 §5.3.1 CRLReason codes, by the names RFC 8555 §7.6 refers to.
REVOCATION_REASONS: dict[str, int] = {
    "unspecified": 0,
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    "removeFromCRL": 8,
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}


# ------------------------------------------------------------------------------------------
# Errors the command line raises itself
# ------------------------------------------------------------------------------------------


class CliError(Exception):
    """A failure with its exit code and the one line that explains it."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    exit_code = EXIT_USAGE


class DatabaseProblem(CliError):
    exit_code = EXIT_DATABASE


class OperationFailed(CliError):
    exit_code = EXIT_FAILED


# ------------------------------------------------------------------------------------------
# Arguments and their environment variables
# ------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


OptionKind = Literal["str", "list", "bool"]


@dataclass(frozen=True)
class _EnvOption:
    flag: str
    env: str
    kind: OptionKind


# dest -> how to find it in the environment; filled by build_parser as options are declared
# (the same dest always maps to the same variable, whichever command declares it).
_ENV_OPTIONS: dict[str, _EnvOption] = {}


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    help: str,
    kind: OptionKind = "str",
    metavar: str | None = None,
) -> None:
    """Declare ``--flag`` with its ``AUTOTLS_FLAG`` environment variable."""
    dest = flag.removeprefix("--").replace("-", "_")
    env = ENV_PREFIX + dest.upper()
    _ENV_OPTIONS[dest] = _EnvOption(flag, env, kind)
    text = f"{help} [env {env}]"
    if kind == "bool":
        parser.add_argument(flag, action="store_true", default=None, help=text)
    elif kind == "list":
        parser.add_argument(flag, nargs="+", default=None, metavar=metavar, help=text)
    else:
        parser.add_argument(flag, default=None, metavar=metavar, help=text)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _apply_environment(args: argparse.Namespace) -> None:
    """Fill every option left unset on the command line from its environment variable, and
    record where each value came from (``args._sources``) so errors can name it."""
    sources: dict[str, str] = {}
    for dest, option in _ENV_OPTIONS.items():
        if not hasattr(args, dest):
            continue
        if getattr(args, dest) is not None:
            sources[dest] = option.flag
            continue
        raw = os.environ.get(option.env, "").strip()
        if not raw:
            continue
        sources[dest] = option.env
        if option.kind == "bool":
            lowered = raw.lower()
            if lowered not in _TRUE | _FALSE:
                raise UsageError(f"{option.env}={raw!r}: expected 1/0, true/false, yes/no, on/off")
            setattr(args, dest, lowered in _TRUE)
        elif option.kind == "list":
            setattr(args, dest, raw.replace(",", " ").split())
        else:
            setattr(args, dest, raw)
    args._sources = sources


def _source(args: argparse.Namespace, dest: str) -> str:
    sources: dict[str, str] = getattr(args, "_sources", {})
    return sources.get(dest) or _ENV_OPTIONS[dest].flag


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "--data-dir",
        metavar="DIR",
        help="data directory (default $XDG_DATA_HOME/autotls or ~/.local/share/autotls)",
    )
    _option(
        parser,
        "--db",
        metavar="URL",
        help="database: sqlite:///FILE, a file path, or postgresql://... "
        "(default: autotls.db in the data directory)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Get and keep a *.<peerid>.libp2p.direct certificate for a libp2p node.",
        epilog="Exit codes: 0 success, 1 failed, 2 usage/configuration, 3 database, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more detail: tracebacks and debug logs (twice: libraries' debug logs too)",
    )
    # -v after the command works too; SUPPRESS keeps a subcommand from resetting the count.
    verbose = _Parser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        parents=[verbose],
        help="issue a real certificate on the local stack and prove it with TLS",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    demo.add_argument(
        "--workdir", type=Path, default=None, metavar="DIR", help="default ./.autotls-demo"
    )
    demo.add_argument(
        "--timeout", type=_seconds, default=120.0, metavar="SECONDS", help="issuance deadline"
    )

    run = commands.add_parser(
        "run", parents=[verbose], help="a py-libp2p node that keeps its certificate"
    )
    _option(
        run,
        "--listen",
        kind="list",
        metavar="MULTIADDR",
        help="listen addresses (default: TCP 4001 and the secure WebSocket on 4002)",
    )
    _option(
        run,
        "--announce",
        kind="list",
        metavar="MULTIADDR",
        help="addresses to register with the broker (default: the listen addresses, with "
        "0.0.0.0/:: expanded to this machine's interface addresses)",
    )
    _option(
        run,
        "--key",
        metavar="FILE",
        help="identity key (default DATA_DIR/identity.key, generated on first run)",
    )
    _add_database_options(run)
    _option(run, "--staging", kind="bool", help="use Let's Encrypt staging")
    _option(run, "--ca", metavar="URL", help="ACME directory URL (default Let's Encrypt)")
    _option(run, "--ca-bundle", metavar="FILE", help="CA file for the ACME server's HTTPS (Pebble)")
    _option(
        run,
        "--trust-roots",
        metavar="FILE",
        help="PEM roots issued chains must build to (default: the system bundle)",
    )
    _option(run, "--broker", metavar="URL", help="broker (default registration.libp2p.direct)")
    _option(run, "--broker-ca-bundle", metavar="FILE", help="CA file for the broker's HTTPS")
    _option(
        run,
        "--dns-server",
        kind="list",
        metavar="HOST:PORT",
        help="where to check the TXT record (default: the zone's authoritative servers)",
    )
    _option(
        run,
        "--allow-private-addresses",
        kind="bool",
        help="register private and loopback addresses (private test networks only)",
    )
    _option(run, "--profile", metavar="NAME", help="ACME certificate profile")
    _option(run, "--eab-kid", metavar="KID", help="External Account Binding key id")
    _option(
        run,
        "--eab-hmac-key",
        metavar="B64URL",
        help="External Account Binding HMAC key (prefer the environment variable)",
    )
    _option(run, "--contact", kind="list", metavar="mailto:ADDR", help="ACME account contact")
    _option(
        run, "--preferred-chain", metavar="ISSUER_CN", help="prefer the chain ending in this CN"
    )
    _option(
        run,
        "--forge-auth",
        metavar="TOKEN",
        help="broker access token (Forge-Authorization; prefer the environment variable)",
    )
    _option(
        run,
        "--once",
        kind="bool",
        help="exit 0 once a valid certificate is installed, 1 on permanent failure",
    )

    status = commands.add_parser("status", parents=[verbose], help="every order in the database")
    _add_database_options(status)
    status.add_argument("--json", action="store_true", help="a JSON array on stdout")

    diagram = commands.add_parser(
        "diagram", parents=[verbose], help="the order machine, or one order's path"
    )
    _add_database_options(diagram)
    diagram.add_argument("--order", type=_order_id, metavar="ID", help="draw this order's path")
    diagram.add_argument("--format", choices=("mermaid", "svg"), default="mermaid")
    diagram.add_argument("--output", type=Path, metavar="FILE", help="write here, not stdout")

    db = commands.add_parser("db", parents=[verbose], help="database schema migrations")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, text in (
        ("upgrade", "bring the schema to this autotls's revision"),
        ("current", "show the current and the head revision"),
    ):
        _add_database_options(db_commands.add_parser(name, parents=[verbose], help=text))

    renew = commands.add_parser("renew", parents=[verbose], help="renew an Installed order now")
    _add_database_options(renew)
    renew.add_argument("--force", action="store_true", help="required: renew before it is due")
    renew.add_argument("--order", type=_order_id, metavar="ID", help="default: the only one")

    retry = commands.add_parser("retry", parents=[verbose], help="start a Failed order over")
    _add_database_options(retry)
    retry.add_argument("--order", type=_order_id, metavar="ID", required=True)

    revoke = commands.add_parser(
        "revoke", parents=[verbose], help="revoke an order's certificate, then renew"
    )
    _add_database_options(revoke)
    revoke.add_argument("--order", type=_order_id, metavar="ID", help="default: the only one")
    revoke.add_argument(
        "--reason", choices=tuple(REVOCATION_REASONS), default=None, help="RFC 5280 reason"
    )
    revoke.add_argument("--no-renew", action="store_true", help="do not force a renewal")
    _option(revoke, "--ca-bundle", metavar="FILE", help="CA file for the ACME server's HTTPS")

    account = commands.add_parser("account", parents=[verbose], help="the stored ACME accounts")
    account_commands = account.add_subparsers(
        dest="account_command", metavar="ACTION", required=True
    )
    show = account_commands.add_parser(
        "show", parents=[verbose], help="directory, URL, status, key thumbprint"
    )
    _add_database_options(show)
    show.add_argument("--json", action="store_true", help="a JSON array on stdout")
    return parser


def _order_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"order id must be a number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"order id must be positive, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autotls")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------
# Resolved settings
# ------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME", "").strip()
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "autotls"


def _data_dir(args: argparse.Namespace) -> Path:
    text = getattr(args, "data_dir", None)
    return Path(text).expanduser() if text else default_data_dir()


def _database_url(args: argparse.Namespace) -> str:
    from autotls.persistence.urls import parse_database_url
    from autotls.service import DATABASE_FILE

    text = getattr(args, "db", None)
    if text:
        try:
            parse_database_url(text)
        except DatabaseURLError as exc:
            raise UsageError(f"{_source(args, 'db')}: {exc}") from None
        return str(text)
    return f"sqlite:///{_data_dir(args) / DATABASE_FILE}"


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
    notes: list[str] = field(default_factory=list)


def _check_url(args: argparse.Namespace, dest: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{_source(args, dest)}: {value!r} is not an http(s) URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise UsageError(f"{_source(args, dest)}: {value!r} has a bad port") from None
    return value


def _check_ca_file(args: argparse.Namespace, dest: str, value: str | None) -> str | None:
    import ssl

    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(
            f"{_source(args, dest)}: cannot use {path} as a CA file: {reason}"
        ) from None
    return str(path)


def _multiaddrs(args: argparse.Namespace, dest: str, values: Sequence[str]) -> list[str]:
    from autotls.multiaddrs import Multiaddr, MultiaddrError

    out = []
    for value in values:
        try:
            out.append(str(Multiaddr.parse(value)))
        except MultiaddrError as exc:
            raise UsageError(f"{_source(args, dest)}: {exc}") from None
    return out


def node_settings(args: argparse.Namespace) -> NodeSettings:
    """Validate every ``run`` option (flags, then environment, then defaults)."""
    from autotls.acme import AcmeInputError, ExternalAccountBinding
    from autotls.adapters import LETS_ENCRYPT, LETS_ENCRYPT_STAGING
    from autotls.broker import DEFAULT_BROKER_URL
    from autotls.dnscheck import parse_nameserver
    from autotls.install import load_trust_roots

    notes: list[str] = []
    data_dir = _data_dir(args)
    key_path = Path(args.key).expanduser() if args.key else data_dir / IDENTITY_FILE
    database_url = _database_url(args)

    if args.staging and args.ca:
        raise UsageError(
            f"{_source(args, 'staging')} and {_source(args, 'ca')} both choose the ACME "
            "directory: give one"
        )
    if args.ca:
        directory_url = _check_url(args, "ca", args.ca)
    else:
        directory_url = LETS_ENCRYPT_STAGING if args.staging else LETS_ENCRYPT

    trust_roots: list[x509.Certificate] | None = None
    if args.trust_roots:
        try:
            trust_roots = load_trust_roots(Path(args.trust_roots).expanduser())
        except ConfigurationError as exc:
            raise UsageError(f"{_source(args, 'trust_roots')}: {exc}") from None
        if not trust_roots:
            raise UsageError(f"{_source(args, 'trust_roots')}: no certificate in the file")
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
                raise UsageError(f"{_source(args, 'dns_server')}: {exc}") from None
        dns_servers = list(args.dns_server)

    eab = None
    if bool(args.eab_kid) != bool(args.eab_hmac_key):
        raise UsageError("External Account Binding needs both --eab-kid and --eab-hmac-key")
    if args.eab_kid and args.eab_hmac_key:
        try:
            eab = ExternalAccountBinding.from_base64url(args.eab_kid, args.eab_hmac_key)
        except AcmeInputError as exc:
            raise UsageError(f"{_source(args, 'eab_hmac_key')}: {exc}") from None

    contact = list(args.contact or [])
    for item in contact:
        if not item.startswith("mailto:") or "@" not in item:
            raise UsageError(
                f"{_source(args, 'contact')}: {item!r} is not a mailto: address "
                "(mailto:you@example.org)"
            )

    listen = _multiaddrs(args, "listen", args.listen or DEFAULT_LISTEN)
    announce = _multiaddrs(args, "announce", args.announce) if args.announce else None
    return NodeSettings(
        data_dir=data_dir,
        key_path=key_path,
        database_url=database_url,
        listen=listen,
        announce=announce,
        directory_url=directory_url,
        ca_file=_check_ca_file(args, "ca_bundle", args.ca_bundle),
        trust_roots=trust_roots,
        broker_url=_check_url(args, "broker", args.broker or DEFAULT_BROKER_URL),
        broker_ca_file=_check_ca_file(args, "broker_ca_bundle", args.broker_ca_bundle),
        dns_servers=dns_servers,
        allow_private_addresses=bool(args.allow_private_addresses),
        profile=args.profile or None,
        eab=eab,
        contact=contact,
        preferred_chain=args.preferred_chain or None,
        forge_auth=args.forge_auth or None,
        once=bool(args.once),
        notes=notes,
    )


def _secrets(args: argparse.Namespace) -> list[str]:
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


# ------------------------------------------------------------------------------------------
# This machine's addresses
# ------------------------------------------------------------------------------------------

_SIOCGIFADDR = 0x8915  # Linux: an interface's primary IPv4 address


def interface_addresses() -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses of this machine's interfaces, loopback included.

    Linux: ``SIOCGIFADDR`` per interface and ``/proc/net/if_inet6``. IPv6 link-local
    addresses are left out (they need a zone id, which multiaddrs cannot carry). When that
    finds nothing (another OS), the source address of the default route is used."""
    v4: list[str] = []
    v6: list[str] = []
    try:
        import fcntl

        for _index, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                request = struct.pack("256s", name.encode()[:15])
                try:
                    answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
                except OSError:  # no IPv4 address on this interface
                    continue
                v4.append(socket.inet_ntoa(answer[20:24]))
    except (ImportError, OSError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            fields = line.split()
            if not fields:
                continue
            ip = ipaddress.IPv6Address(int(fields[0], 16))
            if not ip.is_link_local:
                v6.append(ip.compressed)
    except (OSError, ValueError):
        pass
    if not v4:
        v4 = _route_source(socket.AF_INET, "198.51.100.1")
    if not v6:
        v6 = _route_source(socket.AF_INET6, "2001:db8::1")
    return list(dict.fromkeys(v4)), list(dict.fromkeys(v6))


def _route_source(family: socket.AddressFamily, probe: str) -> list[str]:
    # connect() on a UDP socket sends nothing: it only makes the kernel pick a route and a
    # source address. The probe is a documentation address that is never contacted.
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            address = str(sock.getsockname()[0])
    except OSError:
        return []
    return [] if ipaddress.ip_address(address).is_unspecified else [address]


def expand_unspecified(addresses: Sequence[str], v4: Sequence[str], v6: Sequence[str]) -> list[str]:
    """``/ip4/0.0.0.0/...`` once per IPv4 address in ``v4`` (``/ip6/::/...`` per ``v6``);
    other addresses unchanged. Order kept, duplicates dropped."""
    from autotls.multiaddrs import Multiaddr

    out: list[str] = []
    for text in addresses:
        ma = Multiaddr.parse(text)
        proto, ip = ma.components[0]
        rest = ma.components[1:]
        if proto == "ip4" and ip == "0.0.0.0":  # noqa: S104 - recognising, not binding
            out.extend(str(Multiaddr((("ip4", a), *rest))) for a in v4)
        elif proto == "ip6" and ip == "::":
            out.extend(str(Multiaddr((("ip6", a), *rest))) for a in v6)
        else:
            out.append(str(ma))
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------
# Output helpers
# ------------------------------------------------------------------------------------------


def _out(line: str = "") -> None:
    print(line, file=sys.stdout, flush=True)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _relative(moment: datetime, now: datetime) -> str:
    seconds = (moment - now).total_seconds()
    span = abs(seconds)
    if span < 90:
        text = f"{span:.0f}s"
    elif span < 90 * 60:
        text = f"{span / 60:.0f}m"
    elif span < 36 * 3600:
        text = f"{span / 3600:.0f}h"
    else:
        text = f"{span / 86400:.0f}d"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _short_peer(peer: str | None) -> str:
    if not peer:
        return "-"
    return peer if len(peer) <= 20 else f"{peer[:10]}…{peer[-6:]}"


def _one_line(text: str, limit: int | None = None) -> str:
    flat = " ".join(text.split())
    if limit is not None and len(flat) > limit:
        return flat[: limit - 1] + "…"
    return flat


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


# ------------------------------------------------------------------------------------------
# Database access for the operator commands
# ------------------------------------------------------------------------------------------


def _require_existing(url_text: str) -> None:
    """Operator commands never create a database: a missing SQLite file is an error."""
    from autotls.persistence.urls import parse_database_url

    url = parse_database_url(url_text)
    if url.get_backend_name() != "sqlite":
        return
    path = Path(str(url.database))
    if not path.is_file():
        raise DatabaseProblem(
            f"no database at {path} (nothing has run with this --data-dir/--db yet; "
            "`autotls run` creates it)"
        )


@contextlib.asynccontextmanager
async def _opened_store(url_text: str, *, upgrade: bool = False) -> AsyncIterator[Store]:
    """The store, opened without creating or upgrading anything unless asked to."""
    from sqlalchemy.exc import SQLAlchemyError

    from autotls.persistence.store import Store
    from autotls.persistence.urls import redact

    if not upgrade:
        _require_existing(url_text)
    try:
        store = await Store.open(url_text, upgrade=upgrade)
    except SQLAlchemyError as exc:
        raise DatabaseProblem(
            f"database {redact(url_text)} is unusable: {_sqlalchemy_reason(exc)}"
        ) from None
    try:
        yield store
    finally:
        await store.close()


def _sqlalchemy_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return _one_line(str(orig if orig is not None else exc), 300)


async def _pick_order(store: Store, order_id: int | None, what: str) -> int:
    """``order_id``, or the only active order; anything else needs ``--order``."""
    from autotls.persistence.models import INACTIVE_STATES
    from autotls.persistence.store import CorruptOrder

    if order_id is not None:
        return order_id
    rows = await store.list_orders()
    active = [r for r in rows if not isinstance(r, CorruptOrder) and r.state not in INACTIVE_STATES]
    if len(active) == 1:
        return active[0].id
    if not active:
        raise UsageError(f"no active order to {what}: give --order ID (see `autotls status`)")
    ids = ", ".join(str(r.id) for r in active)
    raise UsageError(f"{len(active)} active orders ({ids}): choose one with --order ID")


# ------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------


@dataclass
class _Stop:
    """A stop request from a signal: which one, and the event ``run`` waits on."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    signal_name: str | None = None


Command = Callable[[argparse.Namespace, _Stop], Awaitable[int]]


async def cmd_demo(args: argparse.Namespace, stop: _Stop) -> int:
    from autotls.demo import DEFAULT_WORKDIR, run_demo

    workdir: Path = args.workdir or DEFAULT_WORKDIR
    _quiet_libp2p(args.verbose)
    result = await run_demo(workdir, progress=_err, timeout_s=args.timeout)
    if args.json:
        _out(json.dumps(result.as_json(), sort_keys=True))
    else:
        _out(f"state:        {result.state}")
        _out(f"tls_verified: {str(result.tls_verified).lower()}")
        _out(f"peer:         {result.peer_id}")
        _out(f"domain:       {result.domain}")
        if result.cert_path:
            _out(f"certificate:  {result.cert_path} (valid until {result.not_after})")
        for index, address in enumerate(result.addresses):
            _out(("addresses:    " if index == 0 else " " * 14) + address)
        _out(f"acme requests {result.acme_requests}, {result.elapsed_s:.1f}s")
        if result.data_dir:
            _out(f"next: autotls status --data-dir {result.data_dir}")
    if not result.ok:
        raise OperationFailed(f"demo failed: {result.error or result.state}")
    return EXIT_OK


async def cmd_run(args: argparse.Namespace, stop: _Stop) -> int:
    settings = node_settings(args)
    _quiet_libp2p(args.verbose)
    return await run_node(settings, stop)


def load_identity(path: Path) -> PrivateKey | None:
    """The identity key at ``path``, or None when nothing is there. A present but
    unreadable or corrupt file raises :class:`PeerIdError` and is left exactly as it was."""
    from autotls.peerid import load_private_key

    if path.exists() or path.is_symlink():
        return load_private_key(path)
    return None


async def run_node(settings: NodeSettings, stop: _Stop) -> int:
    from autotls.fsm.machine import State
    from autotls.node import Libp2pNode, NodeError
    from autotls.peerid import PrivateKey, save_private_key
    from autotls.persistence.urls import redact
    from autotls.service import AutoTLS

    for note in settings.notes:
        _err(f"autotls: note: {note}")
    key = load_identity(settings.key_path)
    created = key is None
    if key is None:
        key = PrivateKey.generate()  # saved once the rest of the configuration is accepted

    node: Libp2pNode | None = None

    def addresses() -> list[str]:
        if settings.announce is not None:
            return list(settings.announce)
        bound = node.listen_addresses if node is not None else []
        return expand_unspecified(bound, *interface_addresses())

    auto = AutoTLS(
        key,
        data_dir=settings.data_dir,
        addresses=addresses,
        database_url=settings.database_url,
        directory_url=settings.directory_url,
        ca_file=settings.ca_file,
        broker_url=settings.broker_url,
        broker_ca_file=settings.broker_ca_file,
        forge_auth=settings.forge_auth,
        dns_servers=settings.dns_servers,
        allow_private_addresses=settings.allow_private_addresses,
        trust_roots=settings.trust_roots,
        eab=settings.eab,
        profile=settings.profile,
        contact=settings.contact,
        preferred_chain=settings.preferred_chain,
    )
    try:
        node = Libp2pNode(key, listen=settings.listen, tls_context=auto.ssl_context)
    except NodeError as exc:
        raise UsageError(f"{exc}") from None
    if not settings.data_dir.exists():
        settings.data_dir.mkdir(parents=True, mode=0o700)
    if created:
        save_private_key(key, settings.key_path)
        _err(f"generated a new identity key in {settings.key_path}")

    finished = asyncio.Event()
    failures: list[Failure] = []
    announce = _Announcer(auto, settings.allow_private_addresses)

    def on_transition(event: OrderEvent) -> None:
        _report_transition(event)
        if event.to_state == State.INSTALLED.value and auto.certificate is not None:
            finished.set()

    def on_failed(failure: Failure) -> None:
        failures.append(failure)
        finished.set()
        if not settings.once:  # a service keeps serving what it has; say what to do
            _err(f"{_describe_failure(failure)}")

    auto.on("transition", on_transition)
    auto.on("failed", on_failed)
    auto.on("loaded", lambda cert: announce.certificate(cert, "loaded"))
    auto.on("renewed", lambda cert: announce.certificate(cert, "renewed"))

    _err(f"peer {key.peer_id.to_base58()} ({auto.peer_id})")
    _err(
        f"database {redact(settings.database_url)}, ACME {settings.directory_url}, "
        f"broker {settings.broker_url}"
    )
    await node.start()
    try:
        _err(f"listening on {', '.join(node.listen_addresses)}")
        await auto.start()
        try:
            snapshot = await auto.order()
            if snapshot.state == State.INSTALLED.value and auto.certificate is not None:
                finished.set()
            waiters = [asyncio.ensure_future(stop.event.wait())]
            if settings.once:
                waiters.append(asyncio.ensure_future(finished.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            final = await auto.order()
        finally:
            _err("stopping")
            await auto.stop()
    finally:
        await node.stop()
    if stop.signal_name is not None:
        _err(f"stopped on {stop.signal_name}")
        if stop.signal_name == "SIGTERM" and not settings.once:
            return EXIT_OK
        return EXIT_INTERRUPTED
    if failures and final.state == State.FAILED.value:
        raise OperationFailed(_describe_failure(failures[-1]))
    return EXIT_OK


def _describe_failure(failure: Failure) -> str:
    return (
        f"order {failure.order_id} failed ({failure.error_class}): {failure.message}; "
        f"fix the cause, then `autotls retry --order {failure.order_id}`"
    )


class _Announcer:
    """Prints the certificate and the forge addresses whenever a certificate is (re)loaded."""

    def __init__(self, auto: AutoTLS, allow_private: bool) -> None:
        self._auto = auto
        self._allow_private = allow_private

    def certificate(self, cert: CertificateInfo, how: str) -> None:
        from autotls.multiaddrs import select_dialable

        forged = self._auto.forge_addresses()
        shown = select_dialable(forged, allow_private=self._allow_private)
        _out(
            f"certificate {how}: {cert.domain} serial {cert.serial}, valid until "
            f"{_when(cert.not_after)}, {cert.chain_path}"
        )
        if shown:
            _out("announce:")
            for address in shown:
                _out(f"  {address}")
        else:
            _out("announce: (no public secure WebSocket address; see --announce)")


def _report_transition(event: OrderEvent) -> None:
    where = f"order {event.order_id}"
    if event.trigger is not None:
        _err(f"{where}: {event.from_state} -> {event.to_state} ({event.trigger})")
    elif event.error_class:
        retry = f", next attempt {_when(event.next_run_at)}" if event.next_run_at else ""
        _err(
            f"{where}: {event.from_state}: {event.error_class} error{retry}: "
            f"{_one_line(event.message or '', 300)}"
        )


async def cmd_status(args: argparse.Namespace, stop: _Stop) -> int:
    url = _database_url(args)
    async with _opened_store(url) as store:
        rows = await store.list_orders()
    now = datetime.now(UTC)
    records = [_order_record(row) for row in rows]
    if args.json:
        _out(json.dumps(records, indent=2, sort_keys=True))
        return EXIT_OK
    if not records:
        _out("no orders")
        return EXIT_OK
    table = [["ID", "PEER", "STATE", "NOT AFTER", "NEXT", "ATTEMPTS", "WAITING / ERROR"]]
    for rec in records:
        next_at = rec["next_run_at"]
        if rec.get("corrupt"):
            next_text = "-"
        elif rec["state"] == "Failed":
            next_text = "retry by hand"
        elif (
            rec.get("lease_owner")
            and rec.get("lease_until")
            and (datetime.fromisoformat(rec["lease_until"]) >= now)
        ):
            next_text = "running"
        elif next_at:
            moment = datetime.fromisoformat(next_at)
            next_text = f"{_when(moment)} ({_relative(moment, now)})"
        else:
            next_text = "-"
        error = ""
        if rec["last_error_class"] or rec["last_error_message"]:
            error = f"{rec['last_error_class']}: {rec['last_error_message']}"
        elif rec.get("waiting_for"):
            error = f"waiting for {rec['waiting_for']}"
        table.append(
            [
                str(rec["id"]),
                _short_peer(rec["peer_id"]),
                str(rec["state"]),
                _when(datetime.fromisoformat(rec["not_after"])) if rec["not_after"] else "-",
                next_text,
                "-" if rec["attempts"] is None else str(rec["attempts"]),
                _one_line(error, 80) or "-",
            ]
        )
    for line in _table(table):
        _out(line)
    return EXIT_OK


def _order_record(row: OrderSnapshot | CorruptOrder) -> dict[str, Any]:
    from autotls.persistence.store import CorruptOrder

    if isinstance(row, CorruptOrder):
        return {
            "id": row.id,
            "peer_id": row.peer_id,
            "identifier": None,
            "state": row.state,
            "not_after": None,
            "next_run_at": None,
            "attempts": None,
            "last_error_class": "corrupt",
            "last_error_message": f"corrupt order row: {row.error}",
            "waiting_for": None,
            "serial": None,
            "lease_owner": None,
            "lease_until": None,
            "created_at": None,
            "updated_at": None,
            "corrupt": True,
        }
    cert = row.certificate
    waiting = row.data.get("waiting_for")
    return {
        "id": row.id,
        "peer_id": row.peer_id,
        "identifier": row.identifier,
        "state": row.state,
        "not_after": _iso(cert.not_after) if cert else None,
        "next_run_at": _iso(row.next_run_at),
        "attempts": row.attempts,
        "last_error_class": row.last_error_class,
        "last_error_message": row.last_error_message,
        "waiting_for": waiting if isinstance(waiting, str) else None,
        "serial": cert.serial if cert else None,
        "lease_owner": row.lease_owner,
        "lease_until": _iso(row.lease_until),
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "corrupt": False,
    }


async def cmd_diagram(args: argparse.Namespace, stop: _Stop) -> int:
    from autotls.fsm import diagrams
    from autotls.fsm.journal import moves
    from autotls.persistence.store import CorruptOrder

    if args.format == "svg" and not diagrams.graphviz_available():
        raise UsageError(
            "--format svg needs Graphviz (`dot` is not on PATH): install graphviz, "
            "or use --format mermaid"
        )
    path = None
    title = None
    if args.order is not None:
        async with _opened_store(_database_url(args)) as store:
            rows = {row.id: row for row in await store.list_orders()}
            row = rows.get(args.order)
            if row is None:
                raise OrderNotFoundError(args.order)
            path = moves(await store.journal(args.order))
        state = row.state if not isinstance(row, CorruptOrder) else f"{row.state} (corrupt)"
        title = f"order {row.id} · {row.peer_id} · {state}"
    text = (
        diagrams.svg(path, title=title)
        if args.format == "svg"
        else diagrams.mermaid(path, title=title)
    )
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return EXIT_OK
    from autotls._files import write_atomic

    try:
        write_atomic(args.output, text.encode())
    except OSError as exc:
        raise UsageError(f"--output: cannot write {args.output}: {exc.strerror or exc}") from None
    _err(f"wrote {args.output}")
    return EXIT_OK


async def cmd_db(args: argparse.Namespace, stop: _Stop) -> int:
    from autotls.persistence import schema
    from autotls.persistence.urls import parse_database_url, redact

    url_text = _database_url(args)
    url = parse_database_url(url_text)
    shown = redact(url)
    if args.db_command == "current":
        _require_existing(url_text)
        status = await asyncio.to_thread(_schema_call, schema.check, url, shown)
        _out(f"database: {shown}")
        _out(f"current:  {status.current or '(empty)'}")
        _out(f"head:     {status.head}")
        _out("up to date" if status.up_to_date else "upgrade needed: run `autotls db upgrade`")
        return EXIT_OK
    before = None
    if _database_exists(url):
        before = (await asyncio.to_thread(_schema_call, schema.check, url, shown)).current
    async with _opened_store(url_text, upgrade=True):
        pass
    after = (await asyncio.to_thread(_schema_call, schema.check, url, shown)).current
    if before == after:
        _out(f"database {shown} is already at {after}")
    else:
        _out(f"database {shown} upgraded from {before or '(empty)'} to {after}")
    return EXIT_OK


def _database_exists(url: Any) -> bool:
    return url.get_backend_name() != "sqlite" or Path(str(url.database)).is_file()


def _schema_call(function: Callable[[Any], Any], url: Any, shown: str) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return function(url)
    except SQLAlchemyError as exc:
        raise DatabaseProblem(f"database {shown} is unusable: {_sqlalchemy_reason(exc)}") from None


async def cmd_renew(args: argparse.Namespace, stop: _Stop) -> int:
    from autotls.fsm.operator import force_renewal

    if not args.force:
        raise UsageError(
            "renew needs --force: the worker renews on its own schedule; --force renews now"
        )
    async with _opened_store(_database_url(args)) as store:
        order_id = await _pick_order(store, args.order, "renew")
        snap = await force_renewal(store, order_id, now=datetime.now(UTC), actor=_actor())
    _out(
        f"order {snap.id}: Installed -> {snap.state}; a running `autotls run` renews it "
        f"within {WORKER_POLL_S}s (or start one)"
    )
    return EXIT_OK


async def cmd_retry(args: argparse.Namespace, stop: _Stop) -> int:
    from autotls.fsm.operator import retry

    async with _opened_store(_database_url(args)) as store:
        snap = await retry(store, args.order, now=datetime.now(UTC), actor=_actor())
    _out(
        f"order {snap.id}: Failed -> {snap.state}; a running `autotls run` resumes it "
        f"within {WORKER_POLL_S}s (or start one)"
    )
    return EXIT_OK


async def cmd_revoke(args: argparse.Namespace, stop: _Stop) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from autotls.acme import AcmeClient, AlreadyRevoked, load_account_key
    from autotls.fsm.machine import State
    from autotls.fsm.operator import force_renewal

    ca_file = _check_ca_file(args, "ca_bundle", args.ca_bundle)
    reason = REVOCATION_REASONS[args.reason] if args.reason else None
    async with _opened_store(_database_url(args)) as store:
        order_id = await _pick_order(store, args.order, "revoke")
        snap = await store.get_order(order_id)
        cert = snap.certificate
        if cert is None:
            raise OperationFailed(f"order {order_id} has no certificate to revoke")
        account = snap.account
        if account is None or account.url is None:
            raise OperationFailed(f"order {order_id} has no registered ACME account to revoke with")
        try:
            account_key = load_account_key(account.key_pem)
        except Exception as exc:
            raise OperationFailed(f"the stored account key is unusable: {exc}") from None
        leaf = x509.load_pem_x509_certificates(cert.chain_pem.encode())[0]
        async with AcmeClient(
            account.directory_url,
            account_key,
            account_url=account.url,
            ca_file=ca_file,
            timeout=30.0,
        ) as client:
            try:
                await client.revoke_certificate(leaf.public_bytes(Encoding.DER), reason=reason)
                _out(
                    f"revoked certificate {cert.serial} of order {order_id} at "
                    f"{account.directory_url}" + (f" ({args.reason})" if args.reason else "")
                )
            except AlreadyRevoked:
                _out(f"certificate {cert.serial} of order {order_id} was already revoked")
        if args.no_renew:
            return EXIT_OK
        if snap.state != State.INSTALLED.value:
            _out(f"order {order_id} is {snap.state}: not forcing a renewal")
            return EXIT_OK
        renewed = await force_renewal(store, order_id, now=datetime.now(UTC), actor=_actor())
    _out(
        f"order {renewed.id}: Installed -> {renewed.state}; a running `autotls run` replaces "
        f"the certificate within {WORKER_POLL_S}s (or start one)"
    )
    return EXIT_OK


async def cmd_account(args: argparse.Namespace, stop: _Stop) -> int:
    async with _opened_store(_database_url(args)) as store:
        accounts = await store.accounts()
    records = [_account_record(a.id, a.directory_url, a.url, a.status, a.key_pem) for a in accounts]
    if args.json:
        _out(json.dumps(records, indent=2, sort_keys=True))
        return EXIT_OK
    if not records:
        _out("no accounts")
        return EXIT_OK
    for rec in records:
        _out(f"account {rec['id']}")
        _out(f"  directory:  {rec['directory_url']}")
        _out(f"  url:        {rec['account_url'] or '(not registered)'}")
        _out(f"  status:     {rec['status']}")
        _out(f"  key:        {rec['key_type']}")
        _out(f"  thumbprint: {rec['thumbprint'] or '-'}")
    return EXIT_OK


def _account_record(
    account_id: int, directory: str, url: str | None, status: str, key_pem: bytes
) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    from autotls.acme import jwk_thumbprint, load_account_key

    key_type: str
    thumbprint: str | None
    try:
        key = load_account_key(key_pem)
        thumbprint = jwk_thumbprint(key)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key_type = f"ECDSA {key.curve.name}"
        elif isinstance(key, rsa.RSAPrivateKey):
            key_type = f"RSA {key.key_size}"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            key_type = "Ed25519"
        else:  # pragma: no cover - load_account_key admits only the three above
            key_type = type(key).__name__
    except Exception as exc:
        key_type, thumbprint = f"unreadable ({_one_line(str(exc), 100)})", None
    return {
        "id": account_id,
        "directory_url": directory,
        "account_url": url,
        "status": status,
        "key_type": key_type,
        "thumbprint": thumbprint,
    }


COMMANDS: dict[str, Command] = {
    "demo": cmd_demo,
    "run": cmd_run,
    "status": cmd_status,
    "diagram": cmd_diagram,
    "db": cmd_db,
    "renew": cmd_renew,
    "retry": cmd_retry,
    "revoke": cmd_revoke,
    "account": cmd_account,
}


# ------------------------------------------------------------------------------------------
# Logging, signals, exit codes
# ------------------------------------------------------------------------------------------

_OUR_LOGGERS = ("autotls",)
_NOISY_LOGGERS = ("aiosqlite", "asyncio", "sqlalchemy", "alembic", "multiaddr", "trio")


def _libp2p_level(verbosity: int) -> int:
    return (logging.CRITICAL, logging.WARNING, logging.DEBUG)[min(verbosity, 2)]


class _Libp2pFilter(logging.Filter):
    """Some py-libp2p modules set their own logger level (INFO), which a level on the
    ``libp2p`` logger cannot override once its records propagate: drop them here."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "libp2p" or record.name.startswith("libp2p."):
            return record.levelno >= self.level
        return True


@contextlib.contextmanager
def _logging(verbosity: int) -> Iterator[None]:
    """stderr logging for the command's lifetime; whatever was configured before comes back."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    if verbosity:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
    handler.addFilter(_Libp2pFilter(_libp2p_level(verbosity)))
    touched = [
        root,
        *(logging.getLogger(n) for n in (*_OUR_LOGGERS, *_NOISY_LOGGERS, "transitions")),
    ]
    saved = [(logger, logger.level) for logger in touched]
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity == 0 else logging.DEBUG)
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity else logging.NOTSET)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)
    # transitions logs every state change at INFO: the worker reports those itself.
    logging.getLogger("transitions").setLevel(logging.DEBUG if verbosity else logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for logger, level in saved:
            logger.setLevel(level)


def _quiet_libp2p(verbosity: int) -> None:
    """py-libp2p's import detaches its ``libp2p`` logger (propagate off, no handler), so its
    warnings about the broker's throw-away dial-back connections reach stderr through
    Python's last-resort handler. Route them through ours and, unless asked, silence them."""
    try:
        import libp2p  # noqa: F401 - imported for its logging side effect
    except ImportError:
        return  # the node reports the missing extra when it starts
    logger = logging.getLogger("libp2p")
    logger.propagate = True
    logger.setLevel(_libp2p_level(verbosity))


def exit_code_for(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message for an exception that ended a command."""
    from sqlalchemy.exc import SQLAlchemyError

    from autotls.localstack.pebble import PebbleError
    from autotls.node import NodeError
    from autotls.service import IssuanceFailed

    if isinstance(exc, CliError):
        return exc.exit_code, str(exc)
    if isinstance(exc, DatabaseURLError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OrderNotFoundError):
        return EXIT_USAGE, f"{exc} (see `autotls status`)"
    if isinstance(exc, (OrderBusyError, ActiveOrderExistsError)):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, StoreError):
        return EXIT_DATABASE, str(exc)
    if isinstance(exc, SQLAlchemyError):
        return EXIT_DATABASE, f"database problem: {_sqlalchemy_reason(exc)}"
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, NodeError) and exc.error_class is ErrorClass.PERMANENT:
        return EXIT_USAGE, str(exc)
    if isinstance(exc, (IssuanceFailed, AutoTLSError)):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, PebbleError):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return EXIT_FAILED, f"{exc.strerror or exc}{where}"
    return EXIT_FAILED, f"unexpected {type(exc).__name__}: {exc}"


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


async def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; SIGINT/SIGTERM ask ``run`` to stop cleanly (a second one, or any
    signal to another command, cancels it)."""
    stop = _Stop()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    graceful = args.command == "run"
    installed: list[int] = []

    def on_signal(signum: int) -> None:
        already = stop.signal_name is not None
        if not already:
            stop.signal_name = signal.Signals(signum).name
            stop.event.set()
        if (already or not graceful) and task is not None:
            task.cancel()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
    try:
        return await COMMANDS[args.command](args, stop)
    finally:
        for number in installed:
            loop.remove_signal_handler(number)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Returns the exit code (never raises, bar a bug in this function)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _apply_environment(args)
    except UsageError as exc:
        _err(f"{PROG}: error: {_one_line(str(exc))}")
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    secrets = _secrets(args)
    with _logging(args.verbose), warnings.catch_warnings():
        if not args.verbose:
            # The system CA bundle holds a root with a negative serial; cryptography warns
            # about it on every load, which tells an operator nothing they can act on.
            from cryptography.utils import CryptographyDeprecationWarning

            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            return asyncio.run(_dispatch(args))
        except (KeyboardInterrupt, asyncio.CancelledError):
            _err(f"{PROG}: interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            code, message = exit_code_for(exc)
            if args.verbose:
                _err(_scrub("".join(traceback.format_exception(exc)).rstrip(), secrets))
            _err(f"{PROG}: error: {_scrub(_one_line(message), secrets)}")
            return code
