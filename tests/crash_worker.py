"""A worker process for the SIGKILL tests (tests/test_engine_crash.py).

It builds real adapters from its arguments, runs one worker with the fault plan from
``AUTOTLS_FAULTS`` (``...:kill`` sends itself SIGKILL at that point), and exits 0 only if the
order got Installed without the fault ever firing -- which the test treats as a failure.
Prints ``newOrder`` each time it places an ACME order, so the parent can count them even
though this process dies without a word.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from datetime import timedelta

from autotls.adapters import AcmeAdapter, BrokerAdapter
from autotls.dnscheck import AuthoritativeTxtChecker, parse_nameserver
from autotls.fsm.clock import SystemClock
from autotls.fsm.faults import FaultPlan
from autotls.fsm.machine import State
from autotls.fsm.ports import AcmeAccount, AcmeOrderView, EngineSettings, Ports
from autotls.fsm.worker import OrderEvent, Worker
from autotls.install import Installer, load_trust_roots
from autotls.peerid import load_private_key
from autotls.persistence.store import Store

FAST = EngineSettings(
    dns_poll_interval=timedelta(milliseconds=100),
    authz_poll_interval=timedelta(milliseconds=100),
    order_poll_interval=timedelta(milliseconds=100),
)


class AnnouncingAcme(AcmeAdapter):
    async def new_order(
        self, account: AcmeAccount, identifier: str, *, profile: str | None, replaces: str | None
    ) -> AcmeOrderView:
        print(f"newOrder {identifier}", flush=True)
        return await super().new_order(account, identifier, profile=profile, replaces=replaces)


async def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("db", "directory", "ca-file", "broker", "dns", "key", "roots", "data-dir"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--order", type=int, required=True)
    parser.add_argument("--address", action="append", default=[])
    args = parser.parse_args()
    key = load_private_key(args.key)
    peer = key.peer_id.to_base36()
    acme = AnnouncingAcme(args.directory, ca_file=args.ca_file)
    broker = BrokerAdapter(
        identity=lambda p: key if p == peer else None,
        addresses=lambda _p: args.address,
        base_url=args.broker,
        allow_private_addresses=True,
    )
    ports = Ports(
        acme=acme,
        broker=broker,
        dns=AuthoritativeTxtChecker(nameservers=[parse_nameserver(args.dns)]),
        installer=Installer(args.data_dir, trust_roots=load_trust_roots(args.roots)),
        clock=SystemClock(),
        settings=FAST,
        rng=random.Random(1),
    )
    store = await Store.open(args.db)
    worker = Worker(store, ports, worker_id="doomed", faults=FaultPlan.from_env())
    stop = asyncio.Event()

    def installed(event: OrderEvent) -> None:
        if event.order_id == args.order and event.to_state == State.INSTALLED.value:
            stop.set()

    worker.subscribe(installed)

    try:
        await asyncio.wait_for(worker.run(stop), timeout=60)
    finally:
        await acme.close()
        await broker.close()
        await store.close()
    print("finished without reaching the fault point", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
