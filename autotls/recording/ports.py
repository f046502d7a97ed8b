"""The engine's ports with every call routed through one place: a :class:`Router`.

What this module owns, and nothing else: one class per port protocol of
:mod:`autotls.fsm.ports` whose every method hands its port name, method name, arguments (by
name), declared result type and -- when there is a real port behind it -- the call itself to
the router. The recorder's router makes the call and writes it down
(:mod:`autotls.recording.recorder`); the replay's router answers from the transcript
(:mod:`autotls.recording.replay`). Both sides route the same calls, by construction.

A port method added to a protocol must be added here too: mypy refuses these classes as the
ports of :class:`~autotls.fsm.ports.Ports` until it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

from autotls.fsm.ports import (
    AcmeAccount,
    AcmeOrderView,
    AcmePort,
    AuthorizationView,
    BrokerHealthView,
    BrokerPort,
    ChainView,
    ChallengeView,
    DnsPort,
    InstalledCertificate,
    InstallerPort,
    ReachabilityView,
    RegisteredAccount,
    RenewalWindow,
    TxtCheck,
)

_P = TypeVar("_P")
_T = TypeVar("_T")
Live = Callable[[], Awaitable[Any]] | None
LiveSync = Callable[[], Any] | None


class Router(Protocol):
    """Where every port call goes. ``live`` makes the real call (None in a replay);
    ``returns`` is the type the port method declares, for reading a recorded result."""

    async def call(
        self, port: str, method: str, args: dict[str, Any], returns: Any, live: Live
    ) -> Any: ...

    def call_sync(
        self, port: str, method: str, args: dict[str, Any], returns: Any, live: LiveSync
    ) -> Any: ...


class _Routed:
    def __init__(self, router: Router, inner: Any, name: str) -> None:
        self._router = router
        self._inner = inner
        self._name = name

    def _live(self, make: Callable[[Any], Awaitable[_T]]) -> Callable[[], Awaitable[_T]] | None:
        inner = self._inner
        return None if inner is None else (lambda: make(inner))

    def _live_sync(self, make: Callable[[Any], _T]) -> Callable[[], _T] | None:
        inner = self._inner
        return None if inner is None else (lambda: make(inner))

    async def _call(
        self, method: str, args: dict[str, Any], returns: Any, make: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        return await self._router.call(self._name, method, args, returns, self._live(make))

    def _call_sync(
        self, method: str, args: dict[str, Any], returns: Any, make: Callable[[Any], Any]
    ) -> Any:
        return self._router.call_sync(self._name, method, args, returns, self._live_sync(make))

    async def close(self) -> None:
        """Close the port behind this one, if it has anything to close."""
        close = getattr(self._inner, "close", None)
        if close is not None:
            await close()


class RoutedAcme(_Routed):
    def __init__(self, router: Router, inner: AcmePort | None, directory_url: str) -> None:
        super().__init__(router, inner, "acme")
        self.directory_url = directory_url

    async def supports_ari(self) -> bool:
        return cast(bool, await self._call("supports_ari", {}, bool, lambda p: p.supports_ari()))

    async def register_account(self, account: AcmeAccount) -> RegisteredAccount:
        return cast(
            RegisteredAccount,
            await self._call(
                "register_account",
                {"account": account},
                RegisteredAccount,
                lambda p: p.register_account(account),
            ),
        )

    async def new_order(
        self, account: AcmeAccount, identifier: str, *, profile: str | None, replaces: str | None
    ) -> AcmeOrderView:
        args: dict[str, Any] = {"account": account, "identifier": identifier}
        args.update(profile=profile, replaces=replaces)
        return cast(
            AcmeOrderView,
            await self._call(
                "new_order",
                args,
                AcmeOrderView,
                lambda p: p.new_order(account, identifier, profile=profile, replaces=replaces),
            ),
        )

    async def get_order(self, account: AcmeAccount, url: str) -> AcmeOrderView:
        return cast(
            AcmeOrderView,
            await self._call(
                "get_order",
                {"account": account, "url": url},
                AcmeOrderView,
                lambda p: p.get_order(account, url),
            ),
        )

    async def get_authorization(self, account: AcmeAccount, url: str) -> AuthorizationView:
        return cast(
            AuthorizationView,
            await self._call(
                "get_authorization",
                {"account": account, "url": url},
                AuthorizationView,
                lambda p: p.get_authorization(account, url),
            ),
        )

    def dns01_value(self, account: AcmeAccount, token: str) -> str:
        return cast(
            str,
            self._call_sync(
                "dns01_value",
                {"account": account, "token": token},
                str,
                lambda p: p.dns01_value(account, token),
            ),
        )

    async def answer_challenge(self, account: AcmeAccount, url: str) -> ChallengeView:
        return cast(
            ChallengeView,
            await self._call(
                "answer_challenge",
                {"account": account, "url": url},
                ChallengeView,
                lambda p: p.answer_challenge(account, url),
            ),
        )

    async def finalize(
        self, account: AcmeAccount, order_url: str, finalize_url: str, csr_der: bytes
    ) -> AcmeOrderView:
        args: dict[str, Any] = {"account": account, "order_url": order_url}
        args.update(finalize_url=finalize_url, csr_der=csr_der)
        return cast(
            AcmeOrderView,
            await self._call(
                "finalize",
                args,
                AcmeOrderView,
                lambda p: p.finalize(account, order_url, finalize_url, csr_der),
            ),
        )

    async def download_certificate(self, account: AcmeAccount, url: str) -> ChainView:
        return cast(
            ChainView,
            await self._call(
                "download_certificate",
                {"account": account, "url": url},
                ChainView,
                lambda p: p.download_certificate(account, url),
            ),
        )

    async def renewal_info(self, cert_pem: str) -> RenewalWindow | None:
        return cast(
            RenewalWindow | None,
            await self._call(
                "renewal_info",
                {"cert_pem": cert_pem},
                RenewalWindow | None,
                lambda p: p.renewal_info(cert_pem),
            ),
        )

    def cert_id(self, cert_pem: str) -> str | None:
        return cast(
            str | None,
            self._call_sync(
                "cert_id", {"cert_pem": cert_pem}, str | None, lambda p: p.cert_id(cert_pem)
            ),
        )

    def generate_account_key(self) -> bytes:
        return cast(
            bytes,
            self._call_sync("generate_account_key", {}, bytes, lambda p: p.generate_account_key()),
        )

    def generate_certificate_key(self) -> bytes:
        return cast(
            bytes,
            self._call_sync(
                "generate_certificate_key", {}, bytes, lambda p: p.generate_certificate_key()
            ),
        )

    def make_csr(self, key_pem: bytes, names: Sequence[str]) -> bytes:
        return cast(
            bytes,
            self._call_sync(
                "make_csr",
                {"key_pem": key_pem, "names": list(names)},
                bytes,
                lambda p: p.make_csr(key_pem, names),
            ),
        )


class RoutedBroker(_Routed):
    def __init__(self, router: Router, inner: BrokerPort | None) -> None:
        super().__init__(router, inner, "broker")

    async def health(self) -> BrokerHealthView:
        return cast(
            BrokerHealthView,
            await self._call("health", {}, BrokerHealthView, lambda p: p.health()),
        )

    async def reachability(self, peer_id: str) -> ReachabilityView:
        return cast(
            ReachabilityView,
            await self._call(
                "reachability",
                {"peer_id": peer_id},
                ReachabilityView,
                lambda p: p.reachability(peer_id),
            ),
        )

    async def register(self, peer_id: str, value: str) -> Sequence[str]:
        return cast(
            Sequence[str],
            await self._call(
                "register",
                {"peer_id": peer_id, "value": value},
                Sequence[str],
                lambda p: p.register(peer_id, value),
            ),
        )


class RoutedDns(_Routed):
    def __init__(self, router: Router, inner: DnsPort | None) -> None:
        super().__init__(router, inner, "dns")

    async def check_txt(self, name: str, expected: str) -> TxtCheck:
        return cast(
            TxtCheck,
            await self._call(
                "check_txt",
                {"name": name, "expected": expected},
                TxtCheck,
                lambda p: p.check_txt(name, expected),
            ),
        )


class RoutedInstaller(_Routed):
    def __init__(self, router: Router, inner: InstallerPort | None) -> None:
        super().__init__(router, inner, "installer")

    async def install(
        self, peer_id: str, identifier: str, chain_pem: str, key_pem: bytes, csr_der: bytes | None
    ) -> InstalledCertificate:
        args: dict[str, Any] = {"peer_id": peer_id, "identifier": identifier}
        args.update(chain_pem=chain_pem, key_pem=key_pem, csr_der=csr_der)
        return cast(
            InstalledCertificate,
            await self._call(
                "install",
                args,
                InstalledCertificate,
                lambda p: p.install(peer_id, identifier, chain_pem, key_pem, csr_der),
            ),
        )
