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

This package owns the process boundary: arguments and their environment variables, exit
codes, what reaches stdout (results) and stderr (progress, warnings, the one-line error),
signals and logging. Everything it does goes through the public pieces (:class:`AutoTLS`,
:class:`autotls.persistence.store.Store`, :mod:`autotls.fsm.operator`,
:mod:`autotls.fsm.diagrams`). One room per job:

=====================  =====================================================================
``options``            the parser; each option's ``AUTOTLS_<OPTION>`` environment variable
``settings``           validation: data directory, database URL, every ``run`` setting
``exits``              exit codes, the command line's own errors, exception -> code + line
``output``             stdout/stderr and formatting (times, tables)
``logs``               logging for the command's lifetime
``database``           the store as operator commands open it; which order; who acted
``run``                ``run`` and ``demo``
``orders``             ``status``, ``diagram``, ``renew``, ``retry``, ``revoke``
``admin``              ``db upgrade``/``db current``, ``account show``
``dispatch``           :func:`main`: parse, signals, run the command, exit code
=====================  =====================================================================

Every ``run`` option has an environment variable ``AUTOTLS_<OPTION>`` (``--dns-server`` ->
``AUTOTLS_DNS_SERVER``; lists separated by spaces or commas; switches take 1/0, true/false,
yes/no, on/off); a flag on the command line wins over its variable. Errors are one line,
``autotls: error: ...``; ``--verbose`` adds the traceback and debug logs; ``run
--log-format json`` makes every stderr line a JSON object. Secrets (keys, the EAB HMAC key,
the forge token, database passwords) are never printed, at any verbosity. Exit codes are
listed in :mod:`autotls.cli.exits` (0, 1, 2, 3, 75, 130).

Start-up is part of the interface: a command imports only what it uses (``--help`` loads
neither SQLAlchemy nor cryptography; ``status``, ``diagram``, ``db current`` and ``account
show`` load neither Alembic nor aiohttp, trio or py-libp2p). Heavy imports therefore sit
inside the functions that need them; ``tests/test_startup.py`` holds every command to it.
"""

from autotls.cli.dispatch import main
from autotls.cli.exits import (
    EXIT_DATABASE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    CliError,
    DatabaseProblem,
    OperationFailed,
    UsageError,
)
from autotls.cli.options import ENV_PREFIX, PROG, apply_environment, build_parser
from autotls.cli.settings import DEFAULT_LISTEN, NodeSettings, node_settings

__all__ = [
    "DEFAULT_LISTEN",
    "ENV_PREFIX",
    "EXIT_DATABASE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TEMPFAIL",
    "EXIT_USAGE",
    "PROG",
    "CliError",
    "DatabaseProblem",
    "NodeSettings",
    "OperationFailed",
    "UsageError",
    "apply_environment",
    "build_parser",
    "main",
    "node_settings",
]
