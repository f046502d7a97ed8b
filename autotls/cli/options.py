"""Arguments and their environment variables: the parser of every command, and how an
option left off the command line is read from ``AUTOTLS_<OPTION>``.

Every ``run`` option (and ``--data-dir``, ``--db``, ``revoke --ca-bundle``) is declared with
:func:`option`, which gives it its variable (``--dns-server`` -> ``AUTOTLS_DNS_SERVER``; lists
separated by spaces or commas; switches take 1/0, true/false, yes/no, on/off). A flag on the
command line wins over its variable, and :func:`source` names whichever gave a value, so an
error can say where the bad value came from. Checking the values is the job of
:mod:`autotls.cli.settings`; here they are only parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

from autotls.acme.revocation import REVOCATION_REASONS
from autotls.cli.exits import UsageError

PROG = "autotls"
ENV_PREFIX = "AUTOTLS_"


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


def option(
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


def apply_environment(args: argparse.Namespace) -> None:
    """Fill every option left unset on the command line from its environment variable, and
    record where each value came from (``args._sources``) so errors can name it."""
    sources: dict[str, str] = {}
    for dest, declared in _ENV_OPTIONS.items():
        if not hasattr(args, dest):
            continue
        if getattr(args, dest) is not None:
            sources[dest] = declared.flag
            continue
        raw = os.environ.get(declared.env, "").strip()
        if not raw:
            continue
        sources[dest] = declared.env
        if declared.kind == "bool":
            lowered = raw.lower()
            if lowered not in _TRUE | _FALSE:
                raise UsageError(
                    f"{declared.env}={raw!r}: expected 1/0, true/false, yes/no, on/off"
                )
            setattr(args, dest, lowered in _TRUE)
        elif declared.kind == "list":
            setattr(args, dest, raw.replace(",", " ").split())
        else:
            setattr(args, dest, raw)
    args._sources = sources


def source(args: argparse.Namespace, dest: str) -> str:
    """Where the value of ``dest`` came from: its flag, or its environment variable."""
    sources: dict[str, str] = getattr(args, "_sources", {})
    return sources.get(dest) or _ENV_OPTIONS[dest].flag


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line, then the environment; raises :class:`UsageError` (and
    ``SystemExit`` for ``--help`` and ``--version``)."""
    args = build_parser().parse_args(argv)
    apply_environment(args)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Get and keep a *.<peerid>.libp2p.direct certificate for a libp2p node.",
        epilog="Exit codes: 0 success, 1 failed, 2 usage/configuration, 3 database, "
        "75 run --once: not done by --deadline (try again later), 130 interrupted.",
    )
    parser.add_argument("--version", action=_Version)
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

    _add_demo(
        commands.add_parser(
            "demo",
            parents=[verbose],
            help="issue a real certificate on the local stack and prove it with TLS",
        )
    )
    _add_run(
        commands.add_parser(
            "run", parents=[verbose], help="a py-libp2p node that keeps its certificate"
        )
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
    option(revoke, "--ca-bundle", metavar="FILE", help="CA file for the ACME server's HTTPS")

    replay = commands.add_parser(
        "replay",
        parents=[verbose],
        help="re-drive the engine against a recorded transcript (offline) and compare",
        description="Replay a transcript written by `run --record`: the real engine against "
        "the recorded answers, a throw-away store, no network. Prints the recorded journal "
        "next to the replayed one. Exit 0 when identical, 1 at the first divergence, 2 when "
        "FILE is not a transcript.",
    )
    replay.add_argument("file", type=Path, metavar="FILE", help="a transcript (order-<id>.jsonl)")

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


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    demo.add_argument(
        "--workdir", type=Path, default=None, metavar="DIR", help="default ./.autotls-demo"
    )
    demo.add_argument(
        "--timeout", type=_seconds, default=120.0, metavar="SECONDS", help="issuance deadline"
    )


def _add_run(run: argparse.ArgumentParser) -> None:
    """``autotls run``'s options; :func:`autotls.cli.settings.node_settings` checks them."""
    option(
        run,
        "--listen",
        kind="list",
        metavar="MULTIADDR",
        help="listen addresses (default: TCP 4001 and the secure WebSocket on 4002)",
    )
    option(
        run,
        "--announce",
        kind="list",
        metavar="MULTIADDR",
        help="addresses to register with the broker (default: the listen addresses, with "
        "0.0.0.0/:: expanded to this machine's interface addresses)",
    )
    option(
        run,
        "--key",
        metavar="FILE",
        help="identity key (default DATA_DIR/identity.key, generated on first run)",
    )
    _add_database_options(run)
    option(run, "--staging", kind="bool", help="use Let's Encrypt staging")
    option(run, "--ca", metavar="URL", help="ACME directory URL (default Let's Encrypt)")
    option(run, "--ca-bundle", metavar="FILE", help="CA file for the ACME server's HTTPS (Pebble)")
    option(
        run,
        "--trust-roots",
        metavar="FILE",
        help="PEM roots issued chains must build to (default: the system bundle)",
    )
    option(run, "--broker", metavar="URL", help="broker (default registration.libp2p.direct)")
    option(run, "--broker-ca-bundle", metavar="FILE", help="CA file for the broker's HTTPS")
    option(
        run,
        "--dns-server",
        kind="list",
        metavar="HOST:PORT",
        help="where to check the TXT record (default: the zone's authoritative servers)",
    )
    option(
        run,
        "--allow-private-addresses",
        kind="bool",
        help="register private and loopback addresses (private test networks only)",
    )
    option(
        run,
        "--registration-delay",
        metavar="DURATION",
        help="place no ACME order until the node has been up this long (Kubo's "
        "AutoTLS.RegistrationDelay; e.g. 90s, 10m, 1h; default 0)",
    )
    option(run, "--profile", metavar="NAME", help="ACME certificate profile")
    option(run, "--eab-kid", metavar="KID", help="External Account Binding key id")
    option(
        run,
        "--eab-hmac-key",
        metavar="B64URL",
        help="External Account Binding HMAC key (prefer the environment variable)",
    )
    option(run, "--contact", kind="list", metavar="mailto:ADDR", help="ACME account contact")
    option(run, "--preferred-chain", metavar="ISSUER_CN", help="prefer the chain ending in this CN")
    option(
        run,
        "--forge-auth",
        metavar="TOKEN",
        help="broker access token (Forge-Authorization; prefer the environment variable)",
    )
    option(
        run,
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on /metrics and a health check on /healthz "
        "(e.g. 127.0.0.1:9464; :PORT for every interface; default off)",
    )
    option(
        run,
        "--once",
        kind="bool",
        help="exit 0 once a valid certificate is installed, 1 on permanent failure, 75 when "
        "it cannot be done by --deadline",
    )
    option(
        run,
        "--deadline",
        metavar="DURATION",
        help="with --once: give up (exit 75, the order is kept) when the next attempt would "
        "come later than this after start (default 10m; e.g. 90s, 10m, 1h30m)",
    )
    option(
        run,
        "--store-poll",
        metavar="DURATION",
        help="how often to re-read the database for what other processes changed, should a "
        "change notification be missed (default 30s)",
    )
    option(
        run,
        "--log-format",
        metavar="FORMAT",
        help="stderr format: human (default) or json (one JSON object per line)",
    )
    option(
        run,
        "--record",
        metavar="DIR",
        help="write each order's steps to DIR/order-<id>.jsonl (sanitised, size-capped) for "
        "`autotls replay`",
    )


def _add_database_options(parser: argparse.ArgumentParser) -> None:
    option(
        parser,
        "--data-dir",
        metavar="DIR",
        help="data directory (default $XDG_DATA_HOME/autotls or ~/.local/share/autotls)",
    )
    option(
        parser,
        "--db",
        metavar="URL",
        help="database: sqlite:///FILE, a file path, or postgresql://... "
        "(default: autotls.db in the data directory)",
    )


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


class _Version(argparse.Action):
    """argparse's ``version`` action, but the version is looked up only when asked for:
    loading importlib.metadata for every command would make ``--help`` half as slow again."""

    def __init__(self, option_strings: list[str], dest: str) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show program's version number and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("autotls")
        except PackageNotFoundError:
            found = "unknown"
        sys.stdout.write(f"{PROG} {found}\n")
        parser.exit()
