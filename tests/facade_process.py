"""An embedding process for the facade's crash test (tests/test_service.py): an
:class:`autotls.AutoTLS` started from its arguments, with whatever ``AUTOTLS_FAULTS`` says
(``before_effect@New:kill`` makes it SIGKILL itself holding the order's lease). Exits 0 only
if it got a certificate without the fault firing, which the test treats as a failure."""

from __future__ import annotations

import argparse
import asyncio

from autotls import AutoTLS, load_private_key


async def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("data-dir", "key", "directory", "ca-file", "broker", "dns"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    key = load_private_key(args.key)
    auto = AutoTLS(
        key,
        data_dir=args.data_dir,
        addresses=["/ip4/127.0.0.1/tcp/1"],
        directory_url=args.directory,
        ca_file=args.ca_file,
        broker_url=args.broker,
        dns_servers=[args.dns],
        allow_private_addresses=True,
        trust_roots=[],
    )
    async with auto:
        async with asyncio.timeout(60):
            await auto.wait_for_certificate()
    print("finished without reaching the fault point", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
