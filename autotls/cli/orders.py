"""The order commands: look at the orders (``status``, ``diagram``) and act on one
(``renew --force``, ``retry``, ``revoke``).

Looking reads the store and the journal; acting goes through :mod:`autotls.fsm.operator`,
which makes the move a journaled transition. A running ``autotls run`` takes it up at once:
the commit is a change its store tells it about (PostgreSQL ``NOTIFY``, SQLite
``data_version``; :mod:`autotls.persistence.changes`), within a second. None of these
commands creates or upgrades a database.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from autotls.cli.database import actor, opened_store, pick_order
from autotls.cli.exits import EXIT_OK, OperationFailed, UsageError
from autotls.cli.output import (
    err,
    iso,
    listed_whole,
    one_line,
    out,
    relative,
    short_peer,
    table,
    when,
)
from autotls.cli.settings import check_ca_file, database_url
from autotls.persistence.errors import OrderNotFoundError

if TYPE_CHECKING:
    from autotls.cli.dispatch import Stop
    from autotls.persistence.records import OrderSnapshot
    from autotls.persistence.store import CorruptOrder

TAKEN_UP = "a running `autotls run` takes it up at once (or start one)"
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


async def cmd_status(args: argparse.Namespace, stop: Stop) -> int:
    url = database_url(args)
    async with opened_store(url) as store:
        rows = await store.list_orders()
    now = datetime.now(UTC)
    records = [_order_record(row) for row in rows]
    if listed_whole(records, as_json=args.json, none="no orders"):
        return EXIT_OK
    lines = [["ID", "PEER", "STATE", "NOT AFTER", "NEXT", "ATTEMPTS", "WAITING / ERROR"]]
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
            next_text = f"{when(moment)} ({relative(moment, now)})"
        else:
            next_text = "-"
        error = ""
        if rec["last_error_class"] or rec["last_error_message"]:
            error = f"{rec['last_error_class']}: {rec['last_error_message']}"
            if rec["last_error_class"] == "configuration":
                error = f"{_needs_fix(rec['last_error_message'])}; {error}"
        elif rec.get("waiting_for"):
            error = f"waiting for {rec['waiting_for']}"
        lines.append(
            [
                str(rec["id"]),
                short_peer(rec["peer_id"]),
                str(rec["state"]),
                when(datetime.fromisoformat(rec["not_after"])) if rec["not_after"] else "-",
                next_text,
                "-" if rec["attempts"] is None else str(rec["attempts"]),
                one_line(error, 80) or "-",
            ]
        )
    for line in table(lines):
        out(line)
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
            "operator_action": None,
        }
    cert = row.certificate
    waiting = row.data.get("waiting_for")
    return {
        "id": row.id,
        "peer_id": row.peer_id,
        "identifier": row.identifier,
        "state": row.state,
        "not_after": iso(cert.not_after) if cert else None,
        "next_run_at": iso(row.next_run_at),
        "attempts": row.attempts,
        "last_error_class": row.last_error_class,
        "last_error_message": row.last_error_message,
        "waiting_for": waiting if isinstance(waiting, str) else None,
        "serial": cert.serial if cert else None,
        "lease_owner": row.lease_owner,
        "lease_until": iso(row.lease_until),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "corrupt": False,
        "operator_action": _operator_action(row),
    }


def _needs_fix(message: str | None) -> str:
    """``needs an operator fix (--trust-roots)``: the options the error names, if any."""
    options = sorted(set(_OPTION.findall(message or "")))
    return "needs an operator fix" + (f" ({', '.join(options)})" if options else "")


def _operator_action(row: OrderSnapshot) -> str | None:
    """What only an operator can do for this order, or None while it needs nobody."""
    from autotls.fsm.machine import State

    if row.last_error_class == "configuration":
        return (
            f"{_needs_fix(row.last_error_message)}: fix the setting, then restart "
            f"`autotls run` with it or `autotls retry --order {row.id}`; the issued "
            "certificate is kept"
        )
    if row.state == State.FAILED.value:
        return f"fix the cause, then `autotls retry --order {row.id}`"
    return None


async def cmd_diagram(args: argparse.Namespace, stop: Stop) -> int:
    from autotls.fsm import diagrams

    if args.format == "svg" and not diagrams.graphviz_available():
        raise UsageError(
            "--format svg needs Graphviz (`dot` is not on PATH): install graphviz, "
            "or use --format mermaid"
        )
    path = None
    title = None
    if args.order is not None:
        # Only an order's path needs the database (and so SQLAlchemy).
        from autotls.fsm.journal import moves
        from autotls.persistence.store import CorruptOrder

        async with opened_store(database_url(args)) as store:
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
    err(f"wrote {args.output}")
    return EXIT_OK


async def cmd_renew(args: argparse.Namespace, stop: Stop) -> int:
    from autotls.fsm.operator import force_renewal

    if not args.force:
        raise UsageError(
            "renew needs --force: the worker renews on its own schedule; --force renews now"
        )
    async with opened_store(database_url(args)) as store:
        order_id = await pick_order(store, args.order, "renew")
        snap = await force_renewal(store, order_id, now=datetime.now(UTC), actor=actor())
    out(f"order {snap.id}: Installed -> {snap.state}; {TAKEN_UP}")
    return EXIT_OK


async def cmd_retry(args: argparse.Namespace, stop: Stop) -> int:
    from autotls.fsm.machine import Trigger
    from autotls.fsm.operator import retry

    async with opened_store(database_url(args)) as store:
        snap = await retry(store, args.order, now=datetime.now(UTC), actor=actor())
        move = (await store.journal(snap.id))[-1]
    if move.trigger == Trigger.RETRY_INSTALL:
        what = "installs the certificate the CA already issued (no new order)"
    else:
        what = "starts the order over (the account is kept)"
    out(f"order {snap.id}: {move.from_state} -> {snap.state}; {what}; {TAKEN_UP}")
    return EXIT_OK


async def cmd_revoke(args: argparse.Namespace, stop: Stop) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from autotls.acme import REVOCATION_REASONS, AcmeClient, AlreadyRevoked, load_account_key
    from autotls.fsm.machine import State
    from autotls.fsm.operator import force_renewal

    ca_file = check_ca_file(args, "ca_bundle", args.ca_bundle)
    reason = REVOCATION_REASONS[args.reason] if args.reason else None
    async with opened_store(database_url(args)) as store:
        order_id = await pick_order(store, args.order, "revoke")
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
                out(
                    f"revoked certificate {cert.serial} of order {order_id} at "
                    f"{account.directory_url}" + (f" ({args.reason})" if args.reason else "")
                )
            except AlreadyRevoked:
                out(f"certificate {cert.serial} of order {order_id} was already revoked")
        # Recorded on the certificate's row (with the forced renewal when there is one): a
        # running autotls stops advertising the revoked certificate's forge addresses.
        if args.no_renew or snap.state != State.INSTALLED.value:
            await store.record_revocation(cert.id, now=datetime.now(UTC), reason=args.reason)
            if not args.no_renew:
                out(f"order {order_id} is {snap.state}: not forcing a renewal")
            return EXIT_OK
        renewed = await force_renewal(
            store,
            order_id,
            now=datetime.now(UTC),
            actor=actor(),
            revoked=True,
            reason=args.reason,
        )
    out(
        f"order {renewed.id}: Installed -> {renewed.state}; the certificate is replaced: "
        f"{TAKEN_UP}"
    )
    return EXIT_OK
