"""One step per state: read the snapshot, reconcile with the server, take the single next
action, and say what happened. Steps never write the database and never sleep; every wait
is returned as data (design.md rules 2, 3 and 7).

Intent ahead: before a call that is not idempotent, a step first returns ``Wait(now)`` with
the intent in ``updates``; the worker commits it, the order is due again at once, and the
next run of the same step makes the call. On resume the intent tells the step to reconcile
(re-fetch, or replay an identical request) instead of repeating blindly:

* newOrder: the request is recorded first; the order URL is persisted the moment it exists
  (Let's Encrypt keeps no order list per account). A replay of the identical newOrder gets
  the same order back from Boulder; Pebble makes a new one (at most one extra per crash).
* finalize: the key and CSR are persisted first; before finalizing, the order is re-fetched,
  and only a ``ready`` order is finalized, so a crash after finalize never finalizes twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import TypeVar

from autotls.fsm.data import (
    ORDER_KEYS,
    BrokerSent,
    ChainDownloaded,
    NewOrderIntent,
    OrderData,
    RegistrationHeld,
    RegistrationHold,
    keys,
    order_data,
)
from autotls.fsm.errors import (
    AutoTLSError,
    ErrorClass,
    OrderInvalidError,
    PermanentError,
    RateLimitedError,
    ReplacesRefusedError,
    TransientError,
)
from autotls.fsm.machine import State, Trigger
from autotls.fsm.outcomes import Advance, Effects, Outcome, Wait
from autotls.fsm.ports import AcmeAccount, AcmeOrderView, AuthorizationView, Ports
from autotls.fsm.renewal_steps import step_installed, step_renew_due
from autotls.fsm.schedule import iso, parse_time, poll_at, stored_time
from autotls.persistence.records import AccountUpdate, NewAccount, NewCertificate, OrderSnapshot

__all__ = ["AUTHZ_EXPIRY_MARGIN", "STEPS", "Step", "iso", "parse_time", "txt_name"]

Step = Callable[[OrderSnapshot, Ports], Awaitable[Outcome]]

AUTHZ_EXPIRY_MARGIN = timedelta(minutes=2)


_V = TypeVar("_V")


def _need(value: _V | None, key: str) -> _V:
    """``value`` (read from the order's data under ``key``), which the state implies."""
    if value is None or value == "":
        raise PermanentError(f"order data lacks {key!r} (was the row edited by hand?)")
    return value


def _account(snap: OrderSnapshot) -> AcmeAccount:
    if snap.account is None or not snap.account.url:
        # Only reachable if the row was placed or edited without a registered account.
        raise PermanentError("order has no registered ACME account; retry it from New")
    return AcmeAccount(snap.account.key_pem, snap.account.url)


def _poll_at(
    now: datetime, since: datetime | None, retry_after: float | None, cap: timedelta, ports: Ports
) -> datetime:
    s = ports.settings
    return poll_at(
        now, since, retry_after, first=s.first_poll_interval, cap=cap, max_wait=s.max_poll_interval
    )


# -- New: the ACME account ----------------------------------------------------------------


async def step_new(snap: OrderSnapshot, ports: Ports) -> Outcome:
    now = ports.clock.now()
    if snap.account is None:
        # Persist a key before registering: a crash after newAccount then finds the key and
        # newAccount with a known key returns the same account, never a second one.
        # If another order already made the store's account, the store links to that one.
        key = ports.acme.generate_account_key()
        return Wait(
            now,
            "account key created",
            effects=Effects(new_account=NewAccount(ports.acme.directory_url, key)),
        )
    if snap.account.directory_url != ports.acme.directory_url:
        # The CA was switched (--staging to production): the store keeps one account per
        # directory, so link the order to this directory's account, made from a fresh key
        # unless the store holds one already (the store then keeps that one).
        key = ports.acme.generate_account_key()
        return Wait(
            now,
            f"account for {ports.acme.directory_url} linked",
            effects=Effects(new_account=NewAccount(ports.acme.directory_url, key)),
        )
    if snap.account.url and snap.account.status == "valid":
        return Advance(Trigger.ACCOUNT_READY, note={"account": snap.account.url, "reused": True})
    registered = await ports.acme.register_account(AcmeAccount(snap.account.key_pem, None))
    if registered.status != "valid":
        raise PermanentError(f"ACME account {registered.url} is {registered.status}")
    return Advance(
        Trigger.ACCOUNT_READY,
        note={"account": registered.url},
        effects=Effects(account_update=AccountUpdate(registered.url, registered.status)),
    )


# -- Registered: place the ACME order -------------------------------------------------------


async def step_registered(snap: OrderSnapshot, ports: Ports) -> Outcome:
    now = ports.clock.now()
    account = _account(snap)
    data = order_data(snap.data)
    order_url = data["order_url"]
    if not order_url:
        profile, replaces = ports.settings.profile, data["replaces"]
        request = {"identifier": snap.identifier, "profile": profile, "replaces": replaces}
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        intent = data["new_order_intent"]
        if not isinstance(intent, Mapping) or intent.get("request") != digest:
            held = await _registration_gate(snap, ports, now)
            if held is not None:
                return held
            recorded: NewOrderIntent = {
                "request": digest,
                "at": iso(now),
                "identifier": snap.identifier,
                "profile": profile,
                "replaces": replaces,
            }
            return Wait(now, "newOrder intent recorded", updates={"new_order_intent": recorded})
        try:
            order = await ports.acme.new_order(
                account, snap.identifier, profile=profile, replaces=replaces
            )
        except ReplacesRefusedError as exc:
            # Order again without `replaces` rather than looping on it; the renewal loses
            # only its ARI rate-limit exemption.
            return Advance(
                Trigger.DROP_REPLACES,
                updates={"replaces": None},
                note={"replaces": replaces, "refused": str(exc)},
            )
        if len(order.authorizations) != 1:
            return Wait(now, "order placed", updates=_placed(order))  # refused below
        try:
            authz = await ports.acme.get_authorization(account, order.authorizations[0])
        except AutoTLSError as exc:
            # The order's URL outlives the error: the policy writes it with the retry.
            exc.keep = _placed(order)
            raise
        return _found(order, authz, ports, account, now)
    # Back after the authorization could not be fetched with the order (or a crash): the
    # order first, which may have died meanwhile. Dropping a dead order waits like a
    # re-order does: a CA that kept handing back dead orders must not make a tight loop.
    order = await ports.acme.get_order(account, order_url)
    if order.status in ("invalid", "expired") or _expired(order, now):
        return _abandon(order.url, f"stored order is {order.status}", ports, now)
    if len(order.authorizations) != 1:
        raise PermanentError(
            f"order {order.url} has {len(order.authorizations)} authorizations, expected 1"
        )
    authz = await ports.acme.get_authorization(account, order.authorizations[0])
    return _found(order, authz, ports, account, now)


def _found(
    order: AcmeOrderView,
    authz: AuthorizationView,
    ports: Ports,
    account: AcmeAccount,
    now: datetime,
) -> Outcome:
    """The order's authorization, as the CA just showed it: on to Challenged, or drop the
    order when the authorization can no longer be won."""
    if authz.status not in ("pending", "valid"):
        return _abandon(order.url, f"its authorization is {authz.status}", ports, now)
    expires = authz.expires or order.expires
    if expires is None:
        raise TransientError(f"authorization {authz.url} has no expiry")
    updates: OrderData = {
        **_placed(order),
        "authz_url": authz.url,
        "authz_expires": iso(expires),
        "authz_status": authz.status,
    }
    if authz.status == "pending":
        # A valid authorization needs no challenge (Challenged reuses it), and Boulder lists
        # only the one that validated it, which may be a type we do not use (dns-persist-01).
        challenge = authz.challenge("dns-01")
        if challenge is None:
            raise PermanentError(f"authorization {authz.url} offers no dns-01 challenge")
        updates["challenge_url"] = challenge.url
        updates["dns_value"] = ports.acme.dns01_value(account, challenge.token)
    return Advance(
        Trigger.ORDER_PLACED,
        updates=updates,
        clear=keys(RegistrationHeld),
        note={"order_url": order.url, "authz_status": authz.status},
    )


async def _registration_gate(snap: OrderSnapshot, ports: Ports, now: datetime) -> Outcome | None:
    """What keeps the order from being placed now, if anything: placing it starts the
    authorization's clock, which only a broker that can dial the node back can stop in time.

    * no address the broker could dial (public ones; private ones too when the broker is
      configured for a private network): hold, and look again every ``dialable_recheck``;
    * the registration delay (Kubo's ``AutoTLS.RegistrationDelay``) since the node came up:
      hold until it is over;
    * the broker unhealthy: wait for it as Challenged does (an outage that outlived a
      pending authorization would cost one order per lapsed authorization).

    A hold is a declared move (``registration_held``, journaled) when it begins or its
    cause changes, and a plain wait while it lasts; ``waiting_for`` says why either way."""
    data = order_data(snap.data)
    settings = ports.settings
    view = await ports.broker.reachability(snap.peer_id)
    if not view.dialable:
        return _hold(
            data,
            RegistrationHold.NOT_DIALABLE,
            f"an address the broker could dial: {view.detail}",
            now + settings.dialable_recheck,
        )
    if settings.registration_delay > timedelta(0) and view.online_since is not None:
        ready = view.online_since + settings.registration_delay
        if now < ready:
            return _hold(
                data,
                RegistrationHold.REGISTRATION_DELAY,
                f"the registration delay ({settings.registration_delay} after the node came "
                f"up at {iso(view.online_since)}): ordering at {iso(ready)}",
                ready,
            )
    await _check_broker_health(ports)
    return None


def _hold(data: OrderData, because: RegistrationHold, reason: str, until: datetime) -> Outcome:
    if data["held_because"] == because.value:
        return Wait(until, reason)
    return Advance(
        Trigger.REGISTRATION_HELD,
        updates={"held_because": because.value, "waiting_for": reason},
        note={"because": because.value, "waiting_for": reason, "until": iso(until)},
        run_at=until,
    )


async def _check_broker_health(ports: Ports) -> None:
    health = await ports.broker.health()
    if not health.healthy:
        # Touch nothing at the CA while the broker is down: every order burnt here would
        # count against Let's Encrypt's limits.
        raise RateLimitedError(
            f"broker unhealthy: {health.detail or 'health check failed'}",
            retry_after=health.wait_s,
        )


def _placed(order: AcmeOrderView) -> OrderData:
    return {
        "order_url": order.url,
        "order_expires": iso(order.expires) if order.expires else None,
    }


def _abandon(order_url: str, why: str, ports: Ports, now: datetime) -> Advance:
    """Drop a stored ACME order the CA made unusable; a new one is placed at ``retry_at``.
    Nothing failed at the CA, so the validation budget is not touched."""
    return Advance(
        Trigger.ABANDON_ORDER,
        clear=ORDER_KEYS,
        note={"order_url": order_url, "reason": why},
        run_at=now + ports.settings.reorder_backoff[0],
    )


def _expired(order: AcmeOrderView, now: datetime) -> bool:
    return order.expires is not None and order.expires <= now


# -- Challenged: the broker -------------------------------------------------------------


async def step_challenged(snap: OrderSnapshot, ports: Ports) -> Outcome:
    now = ports.clock.now()
    data = order_data(snap.data)
    if data["authz_status"] == "valid":
        # The CA reused a still-valid authorization for this account: there is nothing to
        # publish, so neither the broker nor DNS is bothered.
        return Advance(
            Trigger.AUTHORIZATION_REUSED,
            updates={"authz_valid_at": iso(now)},
            note={"authz_url": data["authz_url"]},
        )
    # Checked before the order too; again here, for an outage that began since.
    await _check_broker_health(ports)
    addresses = await ports.broker.register(snap.peer_id, _need(data["dns_value"], "dns_value"))
    authz_expires = parse_time(data["authz_expires"], "authz_expires")
    deadline = min(authz_expires - AUTHZ_EXPIRY_MARGIN, now + ports.settings.dns_deadline_cap)
    return Advance(
        Trigger.BROKER_ACCEPTED,
        updates={"broker_sent_at": iso(now), "txt_deadline": iso(deadline)},
        note={"addresses": list(addresses)},
    )


# -- BrokerNotified: DNS propagation -----------------------------------------------------------


def txt_name(peer_id: str, zone: str) -> str:
    return f"_acme-challenge.{peer_id}.{zone}"


async def step_broker_notified(snap: OrderSnapshot, ports: Ports) -> Outcome:
    now = ports.clock.now()
    data = order_data(snap.data)
    check = await ports.dns.check_txt(
        txt_name(snap.peer_id, ports.settings.zone), _need(data["dns_value"], "dns_value")
    )
    if check.visible:
        return Advance(
            Trigger.TXT_VISIBLE,
            updates={"txt_seen_at": iso(now), "txt_seen_fence": snap.fence},
            note={"servers": dict(check.servers)},
        )
    deadline = parse_time(data["txt_deadline"], "txt_deadline")
    if now < deadline:
        # No Retry-After in DNS: the geometric schedule from the broker's answer.
        sent = stored_time(data["broker_sent_at"], "broker_sent_at")
        return Wait(
            min(_poll_at(now, sent, None, ports.settings.dns_poll_interval, ports), deadline),
            "waiting for the TXT record on the authoritative servers",
        )
    resends = int(data["txt_resends"] or 0)
    authz_expires = parse_time(data["authz_expires"], "authz_expires")
    if resends < ports.settings.txt_resend_limit and authz_expires - now > AUTHZ_EXPIRY_MARGIN:
        return Advance(
            Trigger.TXT_TIMEOUT,
            updates={"txt_resends": resends + 1},
            clear=keys(BrokerSent),
            note={"servers": dict(check.servers), "resend": resends + 1},
        )
    # Never answer a challenge whose TXT nobody can see: the CA would fail it, and failed
    # validations are rate-limited. Abandon this order (nothing failed at the CA).
    return Advance(
        Trigger.REORDER,
        clear=ORDER_KEYS,
        note={"reason": "TXT record never became visible", "servers": dict(check.servers)},
        run_at=now + ports.settings.reorder_backoff[0],
    )


# -- DNSPropagated: answer the challenge, await validation, finalize --------------------------


async def step_dns_propagated(snap: OrderSnapshot, ports: Ports) -> Outcome:
    """Answer the challenge (once), then poll the order: it is ``ready`` once the CA has
    validated the authorization, and is finalized in the same step. The certificate key and
    CSR are recorded with the answer, so finalizing needs no intent of its own: a run that
    crashed after finalize finds the order ``processing`` or ``valid`` and just moves on
    (the CA refuses to finalize anything but a ``ready`` order)."""
    now = ports.clock.now()
    data = order_data(snap.data)
    account = _account(snap)
    settings = ports.settings
    if not data["answered_at"]:
        answer_now = data["txt_seen_fence"] is not None and snap.fence == data["txt_seen_fence"] + 1
        if not answer_now:
            # A claim since the TXT was seen may have answered and crashed before its commit:
            # the CA's view decides (the answer is never sent twice).
            authz = await ports.acme.get_authorization(
                account, _need(data["authz_url"], "authz_url")
            )
            challenge = authz.challenge("dns-01")
            answer_now = (
                authz.status == "pending"
                and challenge is not None
                and challenge.status == "pending"
            )
        if answer_now:
            await _answer(account, data, ports)
        updates: OrderData = {"answered_at": iso(now)}
        effects = Effects()
        if snap.cert_key_pem is None or not data["csr_der"]:
            csr_recorded, effects = _new_key_and_csr(snap, ports)
            updates.update(csr_recorded)
        return Wait(
            _poll_at(now, now, None, settings.authz_poll_interval, ports),
            "challenge answered; waiting for the CA to validate",
            updates=updates,
            effects=effects,
        )
    order = await ports.acme.get_order(account, _need(data["order_url"], "order_url"))
    answered = stored_time(data["answered_at"], "answered_at")
    if order.status == "pending":
        return Wait(
            _poll_at(now, answered, order.retry_after, settings.authz_poll_interval, ports),
            "waiting for the CA to validate",
        )
    valid: OrderData = {"authz_valid_at": iso(now)}
    if snap.cert_key_pem is not None:
        order = await _finalize_if_ready(account, order, data["csr_der"], ports)
    if order.status in ("ready", "processing", "valid"):
        # ready: no CSR recorded (a row from an older version): Validated records one.
        # processing or valid: finalized, by this run or by one that crashed before its commit.
        wait = order.status == "processing"
        return Advance(
            Trigger.AUTHORIZATION_VALID,
            updates=valid,
            note={"order_status": order.status},
            run_at=_poll_at(now, now, order.retry_after, settings.order_poll_interval, ports)
            if wait
            else None,
        )
    # The order is invalid (or gone): the authorization's challenge says why.
    authz = await ports.acme.get_authorization(account, _need(data["authz_url"], "authz_url"))
    if authz.status == "valid":
        # Validated, but the order died (expired): Validated decides, as after a finalize.
        return Advance(
            Trigger.AUTHORIZATION_VALID, updates=valid, note={"order_status": order.status}
        )
    challenge = authz.challenge("dns-01")
    problem = (challenge.error if challenge is not None else None) or order.error
    detail = problem.get("detail") if isinstance(problem, Mapping) else None
    raise OrderInvalidError(
        f"authorization {authz.status}, order {order.status}" + (f": {detail}" if detail else ""),
        problem=problem,
    )


async def _answer(account: AcmeAccount, data: OrderData, ports: Ports) -> None:
    """Answer the challenge from its stored URL (no fetch first). A refusal is reconciled
    from the CA's view: a run that crashed before committing ``answered_at`` may have
    answered already, and Pebble refuses a second answer once the challenge left pending."""
    try:
        await ports.acme.answer_challenge(account, _need(data["challenge_url"], "challenge_url"))
    except AutoTLSError as refused:
        if refused.error_class in (ErrorClass.TRANSIENT, ErrorClass.RATE_LIMITED):
            raise  # not a refusal: the next claim asks the CA first (see txt_seen_fence)
        try:
            authz = await ports.acme.get_authorization(
                account, _need(data["authz_url"], "authz_url")
            )
        except AutoTLSError:
            raise refused from None
        challenge = authz.challenge("dns-01")
        if authz.status == "pending" and (challenge is None or challenge.status == "pending"):
            raise
        # Answered by a run that crashed before its commit: the CA's view decides from here.


# -- Validated: key, CSR, finalize ------------------------------------------------------------


async def step_validated(snap: OrderSnapshot, ports: Ports) -> Outcome:
    now = ports.clock.now()
    data = order_data(snap.data)
    account = _account(snap)
    if snap.cert_key_pem is None or not data["csr_der"]:
        # A reused authorization (no challenge answered), or a row from an older version.
        csr_recorded, effects = _new_key_and_csr(snap, ports)
        return Wait(now, "certificate key and CSR recorded", updates=csr_recorded, effects=effects)
    order = await ports.acme.get_order(account, _need(data["order_url"], "order_url"))
    order = await _finalize_if_ready(account, order, data["csr_der"], ports)
    since = stored_time(data["authz_valid_at"], "authz_valid_at")
    return _after_finalize(order, now, since, ports)


def _new_key_and_csr(snap: OrderSnapshot, ports: Ports) -> tuple[OrderData, Effects]:
    """A fresh certificate key (stored in ``orders.cert_key_pem``, never in the data) and the
    CSR recorded for it, before anything is finalized with it."""
    key = ports.acme.generate_certificate_key()
    csr = ports.acme.make_csr(key, [snap.identifier])
    return {"csr_der": base64.b64encode(csr).decode("ascii")}, Effects(cert_key_pem=key)


async def _finalize_if_ready(
    account: AcmeAccount, order: AcmeOrderView, csr_b64: str | None, ports: Ports
) -> AcmeOrderView:
    """Finalize with the recorded CSR when the CA says the order is ``ready`` (it refuses
    anything else, so a run after a crashed finalize just reads the order on)."""
    if order.status != "ready" or not csr_b64:
        return order
    return await ports.acme.finalize(account, order.url, order.finalize, base64.b64decode(csr_b64))


def _after_finalize(
    order: AcmeOrderView, now: datetime, since: datetime | None, ports: Ports
) -> Outcome:
    if order.status == "valid":
        if not order.certificate:
            raise TransientError(f"order {order.url} is valid but has no certificate URL yet")
        return Advance(
            Trigger.CERTIFICATE_ISSUED,
            updates={"certificate_url": order.certificate},
            note={"certificate_url": order.certificate},
        )
    if order.status in ("processing", "ready"):
        return Wait(
            _poll_at(now, since, order.retry_after, ports.settings.order_poll_interval, ports),
            f"order {order.status}",
        )
    if order.status == "invalid" and order.error is None and _expired(order, now):
        # It expired before it was finalized (e.g. a Retry-After longer than the order's
        # life): nothing failed at the CA, so no failed validation is counted; order again.
        return Advance(
            Trigger.REORDER,
            clear=ORDER_KEYS,
            note={"reason": "the order expired before it was finalized", "order_url": order.url},
            effects=Effects(cert_key_pem=None),
        )
    if order.status == "invalid" or _expired(order, now):
        detail = order.error.get("detail") if order.error else None
        raise OrderInvalidError(
            f"order {order.status}" + (f": {detail}" if detail else ""), problem=order.error
        )
    raise TransientError(f"order {order.url} is {order.status} after validation")


# -- Finalized: download, verify, install -------------------------------------------------------


async def step_finalized(snap: OrderSnapshot, ports: Ports) -> Outcome:
    """Download, persist, then verify and install. The chain is stored in the row before
    anything can reject it: a certificate the CA issued is never thrown away (Let's Encrypt
    allows 5 duplicates a week), and installing it again after a fix needs no new order."""
    now = ports.clock.now()
    data = order_data(snap.data)
    if snap.cert_key_pem is None:
        raise PermanentError("the certificate key of this order is missing from the store")
    chain_pem = data["chain_pem"]
    if not chain_pem:
        account = _account(snap)
        url = _need(data["certificate_url"], "certificate_url")
        chain = await ports.acme.download_certificate(account, url)
        return Wait(now, "certificate chain downloaded", updates={"chain_pem": chain.pem})
    csr_b64 = data["csr_der"]
    csr = base64.b64decode(csr_b64) if csr_b64 else None
    installed = await ports.installer.install(
        snap.peer_id, snap.identifier, chain_pem, snap.cert_key_pem, csr
    )
    return Advance(
        Trigger.CERTIFICATE_INSTALLED,
        updates={"installed_at": iso(now), "renewal": None},
        clear=keys(ChainDownloaded),  # it lives in the certificate's row from now on
        note={"serial": installed.serial, "not_after": iso(installed.not_after)},
        effects=Effects(
            cert_key_pem=None,
            new_certificate=NewCertificate(
                chain_pem=installed.chain_pem,
                key_pem=snap.cert_key_pem,
                serial=installed.serial,
                cert_id=ports.acme.cert_id(installed.chain_pem),
                not_before=installed.not_before,
                not_after=installed.not_after,
                acme_order_url=data["order_url"] or None,
                replaces_cert_id=data["replaces"],
            ),
        ),
    )


STEPS: Mapping[State, Step] = {
    State.NEW: step_new,
    State.REGISTERED: step_registered,
    State.CHALLENGED: step_challenged,
    State.BROKER_NOTIFIED: step_broker_notified,
    State.DNS_PROPAGATED: step_dns_propagated,
    State.VALIDATED: step_validated,
    State.FINALIZED: step_finalized,
    State.INSTALLED: step_installed,
    State.RENEW_DUE: step_renew_due,
}
