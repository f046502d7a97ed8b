"""pebble-challtestsrv's management API, as far as the local stack uses it: TXT records.

Two quirks (protocol.md §7) live here and nowhere else: a host registered without the trailing
dot is silently never served, and ``/set-txt`` appends a value rather than replacing it -- so
:meth:`ChallTestSrv.replace_txt` clears first, which gives the broker's "one TXT value per
PeerID, last write wins".
"""

from __future__ import annotations

from types import TracebackType

import aiohttp

MAX_ERROR_BODY = 500


class ChallTestSrvError(RuntimeError):
    """challtestsrv refused a management call or could not be reached."""


def dotted(fqdn: str) -> str:
    return fqdn if fqdn.endswith(".") else fqdn + "."


class ChallTestSrv:
    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def set_txt(self, fqdn: str, value: str) -> None:
        """Add ``value`` to the TXT record of ``fqdn`` (challtestsrv appends)."""
        await self._post("/set-txt", {"host": dotted(fqdn), "value": value})

    async def clear_txt(self, fqdn: str) -> None:
        await self._post("/clear-txt", {"host": dotted(fqdn)})

    async def replace_txt(self, fqdn: str, value: str) -> None:
        """Serve exactly ``value`` for ``fqdn``: clear, then set."""
        await self.clear_txt(fqdn)
        await self.set_txt(fqdn, value)

    async def _post(self, path: str, body: dict[str, str]) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trust_env=False)
            self._owns_session = True
        url = self.url + path
        try:
            async with self._session.post(url, json=body, timeout=self._timeout) as resp:
                if resp.status != 200:
                    text = (await resp.content.read(MAX_ERROR_BODY)).decode("utf-8", "replace")
                    raise ChallTestSrvError(f"POST {url}: HTTP {resp.status}: {text}".rstrip())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ChallTestSrvError(f"POST {url} failed: {exc!r}") from None

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> ChallTestSrv:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
