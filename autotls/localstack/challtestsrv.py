"""pebble-challtestsrv's management API, as far as the local stack uses it: TXT records.

Two quirks (protocol.md §7) live here and nowhere else: a host registered without the trailing
dot is silently never served, and ``/set-txt`` appends a value rather than replacing it -- so
:meth:`ChallTestSrv.replace_txt` clears first, which gives the broker's "one TXT value per
PeerID, last write wins".
"""

from __future__ import annotations

import json

from autotls.http import HttpClient, HttpFailure, HttpTransport

MAX_BODY = 64 * 1024
DEFAULT_TIMEOUT = 10.0
MAX_ERROR_TEXT = 500


class ChallTestSrvError(RuntimeError):
    """challtestsrv refused a management call or could not be reached."""


def dotted(fqdn: str) -> str:
    return fqdn if fqdn.endswith(".") else fqdn + "."


class ChallTestSrv(HttpClient):
    """The management API at ``url``, over a shared ``http`` transport or one of its own."""

    def __init__(
        self,
        url: str,
        *,
        http: HttpTransport | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(http, timeout=timeout, default_timeout=DEFAULT_TIMEOUT)
        self.url = url.rstrip("/")

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
        url = self.url + path
        try:
            answer = await self.http.request(
                "POST",
                url,
                request_class=path.lstrip("/"),
                headers={"Content-Type": "application/json"},
                body=json.dumps(body).encode(),
                limit=MAX_BODY,
            )
        except HttpFailure as exc:
            raise ChallTestSrvError(str(exc)) from None
        if answer.status != 200:
            text = answer.body[:MAX_ERROR_TEXT].decode("utf-8", "replace")
            raise ChallTestSrvError(f"POST {url}: HTTP {answer.status}: {text}".rstrip())
