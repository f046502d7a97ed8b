"""The administration commands: the schema (``db upgrade``, ``db current``) and the stored
ACME accounts (``account show``: directory, URL, status, key type and thumbprint, never the
key itself)."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from autotls.cli.database import database_exists, opened_store, require_existing, schema_call
from autotls.cli.exits import EXIT_OK
from autotls.cli.output import listed_whole, one_line, out
from autotls.cli.settings import database_url

if TYPE_CHECKING:
    from autotls.cli.dispatch import Stop


async def cmd_db(args: argparse.Namespace, stop: Stop) -> int:
    from autotls.persistence import schema
    from autotls.persistence.urls import parse_database_url, redact

    url_text = database_url(args)
    url = parse_database_url(url_text)
    shown = redact(url)
    if args.db_command == "current":
        require_existing(url_text)
        status = await asyncio.to_thread(schema_call, schema.check, url, shown)
        out(f"database: {shown}")
        out(f"current:  {status.current or '(empty)'}")
        out(f"head:     {status.head}")
        out("up to date" if status.up_to_date else "upgrade needed: run `autotls db upgrade`")
        return EXIT_OK
    before = None
    if database_exists(url):
        before = (await asyncio.to_thread(schema_call, schema.check, url, shown)).current
    async with opened_store(url_text, upgrade=True):
        pass
    after = (await asyncio.to_thread(schema_call, schema.check, url, shown)).current
    if before == after:
        out(f"database {shown} is already at {after}")
    else:
        out(f"database {shown} upgraded from {before or '(empty)'} to {after}")
    return EXIT_OK


async def cmd_account(args: argparse.Namespace, stop: Stop) -> int:
    async with opened_store(database_url(args)) as store:
        accounts = await store.accounts()
    records = [_account_record(a.id, a.directory_url, a.url, a.status, a.key_pem) for a in accounts]
    if listed_whole(records, as_json=args.json, none="no accounts"):
        return EXIT_OK
    for rec in records:
        out(f"account {rec['id']}")
        out(f"  directory:  {rec['directory_url']}")
        out(f"  url:        {rec['account_url'] or '(not registered)'}")
        out(f"  status:     {rec['status']}")
        out(f"  key:        {rec['key_type']}")
        out(f"  thumbprint: {rec['thumbprint'] or '-'}")
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
        key_type, thumbprint = f"unreadable ({one_line(str(exc), 100)})", None
    return {
        "id": account_id,
        "directory_url": directory,
        "account_url": url,
        "status": status,
        "key_type": key_type,
        "thumbprint": thumbprint,
    }
