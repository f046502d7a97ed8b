"""Real Pebble and pebble-challtestsrv as child processes: the CA of the local stack, the
integration tests and the benchmarks.

:class:`PebbleStack` owns the two processes and everything they need in ``workdir``: a TLS CA and
server certificate for Pebble's HTTPS listeners (generated with ``cryptography``, because this
also runs in the product demo where trustme is not installed), Pebble's JSON config, and one
log file per process. challtestsrv runs only its DNS server and management API; Pebble resolves
through it, so a TXT set with :meth:`PebbleStack.set_txt` is what Pebble's DNS-01 validation sees.

Both processes get their own process group and are stopped with SIGTERM, then SIGKILL; a stack
that is started is stopped on exceptions during start, on :meth:`stop`, on context exit and at
interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from autotls._files import write_atomic, write_secret
from autotls.http import ssl_context
from autotls.localstack.challtestsrv import ChallTestSrv, ChallTestSrvError

PEBBLE = "pebble"
CHALLTESTSRV = "pebble-challtestsrv"
START_DEADLINE_S = 20.0
STOP_GRACE_S = 5.0
_LOG_TAIL_BYTES = 4000


class PebbleError(RuntimeError):
    """Pebble or challtestsrv could not be started or answered unexpectedly."""


@dataclass
class PebbleOptions:
    """Pebble's fault and behaviour knobs (environment variables and config fields)."""

    nonce_reject_percent: int = 0
    va_always_valid: bool = False
    authz_reuse_percent: int | None = None
    alternate_roots: int = 0
    chain_length: int | None = None
    eab_keys: dict[str, str] | None = None
    certificate_validity_s: int | None = None
    va_nosleep: bool = True


def pebble_available() -> bool:
    """Both binaries are on PATH."""
    return shutil.which(PEBBLE) is not None and shutil.which(CHALLTESTSRV) is not None


def _free_tcp_port(host: str, taken: set[int]) -> int:
    for _ in range(50):
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise PebbleError(f"no free TCP port on {host}")


def _free_dns_port(host: str, taken: set[int]) -> int:
    """A port free for both UDP and TCP: challtestsrv serves DNS on both."""
    for _ in range(50):
        with (
            socket.socket(_family(host), socket.SOCK_DGRAM) as udp,
            socket.socket(_family(host), socket.SOCK_STREAM) as tcp,
        ):
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind((host, port))
            except OSError:
                continue
        if port not in taken:
            taken.add(port)
            return port
    raise PebbleError(f"no port free for UDP and TCP on {host}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def generate_tls_files(workdir: Path, host: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for ``host`` (and localhost), valid 30 days.
    Returns (ca.pem, cert.pem, key.pem); the key files are written 0600."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "autotls local Pebble TLS CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt_names.append(x509.DNSName(host))
    for loopback in ("127.0.0.1", "::1"):
        if loopback != host:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(loopback)))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = workdir / "pebble-tls-ca.pem"
    cert_file = workdir / "pebble-tls-cert.pem"
    key_file = workdir / "pebble-tls-key.pem"
    write_atomic(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
    write_secret(
        key_file,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return ca_file, cert_file, key_file


class _Process:
    """One child in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.popen = subprocess.Popen(  # noqa: S603 - fixed argv, binaries from PATH
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise

    def exited(self) -> int | None:
        return self.popen.poll()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(STOP_GRACE_S)
        self._log.close()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - _LOG_TAIL_BYTES))
                return fh.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"


class PebbleStack:
    """Pebble + challtestsrv on free loopback ports. ``start()`` returns when both answer."""

    def __init__(
        self,
        workdir: Path,
        options: PebbleOptions | None = None,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        self.options = options if options is not None else PebbleOptions()
        self.host = host
        self._pebble: _Process | None = None
        self._challtestsrv: _Process | None = None
        self._ssl: ssl.SSLContext | None = None
        self._ports: dict[str, int] = {}
        self._config_path = self.workdir / "pebble-config.json"
        self.ca_file = self.workdir / "pebble-tls-ca.pem"

    # -- addresses ------------------------------------------------------------------------

    def _port(self, name: str) -> int:
        try:
            return self._ports[name]
        except KeyError:
            raise PebbleError("PebbleStack is not started") from None

    @property
    def directory_url(self) -> str:
        return f"https://{_hostport(self.host, self._port('acme'))}/dir"

    @property
    def management_url(self) -> str:
        """Pebble's management API (HTTPS, same CA): roots, intermediates, cert status."""
        return f"https://{_hostport(self.host, self._port('management'))}"

    @property
    def challtestsrv_url(self) -> str:
        """challtestsrv's management API (plain HTTP)."""
        return f"http://{_hostport(self.host, self._port('challtestsrv'))}"

    @property
    def dns_address(self) -> tuple[str, int]:
        return (self.host, self._port("dns"))

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._pebble is not None or self._challtestsrv is not None:
            raise PebbleError("PebbleStack already started")
        if not pebble_available():
            raise PebbleError(f"{PEBBLE} and {CHALLTESTSRV} must be on PATH")
        self.workdir.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        self._ports = {
            "acme": _free_tcp_port(self.host, taken),
            "management": _free_tcp_port(self.host, taken),
            "http01": _free_tcp_port(self.host, taken),
            "tlsalpn01": _free_tcp_port(self.host, taken),
            "challtestsrv": _free_tcp_port(self.host, taken),
            "dns": _free_dns_port(self.host, taken),
        }
        ca_file, cert_file, key_file = generate_tls_files(self.workdir, self.host)
        self.ca_file = ca_file
        self._ssl = ssl_context(ca_file)
        self._write_config(cert_file, key_file)
        atexit.register(self.stop)
        try:
            self._challtestsrv = _Process(
                "challtestsrv",
                [
                    CHALLTESTSRV,
                    "-dns01",
                    _hostport(self.host, self._port("dns")),
                    "-management",
                    _hostport(self.host, self._port("challtestsrv")),
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-defaultIPv4",
                    "127.0.0.1",
                ],
                self._base_env(),
                self.workdir / "challtestsrv.log",
            )
            self._wait_ready(self._challtestsrv, self._challtestsrv_answers)
            self._start_pebble()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop both processes (idempotent)."""
        for attr in ("_pebble", "_challtestsrv"):
            process: _Process | None = getattr(self, attr)
            setattr(self, attr, None)
            if process is not None:
                process.stop()
        atexit.unregister(self.stop)

    def restart_pebble(self) -> None:
        """Restart Pebble on the same ports. Pebble keeps nothing: accounts, orders and its
        issuing roots are new afterwards (an old kid gets accountDoesNotExist)."""
        if self._pebble is None:
            raise PebbleError("PebbleStack is not started")
        self._pebble.stop()
        self._pebble = None
        self._start_pebble()

    def _start_pebble(self) -> None:
        env = self._base_env()
        opts = self.options
        env["PEBBLE_WFE_NONCEREJECT"] = str(opts.nonce_reject_percent)
        if opts.va_nosleep:
            env["PEBBLE_VA_NOSLEEP"] = "1"
        if opts.va_always_valid:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        if opts.authz_reuse_percent is not None:
            env["PEBBLE_AUTHZREUSE"] = str(opts.authz_reuse_percent)
        if opts.alternate_roots:
            env["PEBBLE_ALTERNATE_ROOTS"] = str(opts.alternate_roots)
        if opts.chain_length is not None:
            env["PEBBLE_CHAIN_LENGTH"] = str(opts.chain_length)
        self._pebble = _Process(
            "pebble",
            [
                PEBBLE,
                "-config",
                str(self._config_path),
                "-dnsserver",
                _hostport(self.host, self._port("dns")),
            ],
            env,
            self.workdir / "pebble.log",
        )
        self._wait_ready(self._pebble, self._pebble_answers)

    def _base_env(self) -> dict[str, str]:
        # Pebble reads its knobs from the environment: inherit none of them by accident.
        return {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}

    def _write_config(self, cert_file: Path, key_file: Path) -> None:
        config: dict[str, Any] = {
            "listenAddress": _hostport(self.host, self._port("acme")),
            "managementListenAddress": _hostport(self.host, self._port("management")),
            "certificate": str(cert_file),
            "privateKey": str(key_file),
            "httpPort": self._port("http01"),
            "tlsPort": self._port("tlsalpn01"),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(self.options.eab_keys),
        }
        if self.options.eab_keys:
            config["externalAccountMACKeys"] = dict(self.options.eab_keys)
        if self.options.certificate_validity_s is not None:
            config["certificateValidityPeriod"] = self.options.certificate_validity_s
        # The EAB MAC keys are test credentials of this throw-away CA, but still keep them 0600.
        write_secret(self._config_path, json.dumps({"pebble": config}, indent=2).encode())

    def _wait_ready(self, process: _Process, answers: Any) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            code = process.exited()
            if code is not None:
                raise PebbleError(
                    f"{process.name} exited with status {code} during start;"
                    f" log tail:\n{process.log_tail()}"
                )
            if answers():
                return
            if time.monotonic() > deadline:
                raise PebbleError(
                    f"{process.name} did not answer within {START_DEADLINE_S:g}s;"
                    f" log tail:\n{process.log_tail()}"
                )
            time.sleep(0.05)

    def _pebble_answers(self) -> bool:
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own https URL
                self.directory_url, timeout=2, context=self._ssl
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _challtestsrv_answers(self) -> bool:
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own http URL
                self.challtestsrv_url + "/", timeout=2
            ):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer (404 for /) means it is serving
        except (urllib.error.URLError, OSError):
            return False

    # -- management -----------------------------------------------------------------------

    def _management_get(self, path: str) -> bytes:
        if self._pebble is None:
            raise PebbleError("Pebble is not running")
        url = self.management_url + path
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own https URL
                url, timeout=5, context=self._ssl
            ) as resp:
                return bytes(resp.read(1024 * 1024))
        except urllib.error.HTTPError as exc:
            raise PebbleError(f"GET {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise PebbleError(f"GET {url} failed: {exc}") from None

    def issuer_roots_pem(self) -> list[str]:
        """The roots Pebble signs issued chains to (one per alternate root chain); they change
        on every Pebble (re)start."""
        return [
            self._management_get(f"/roots/{index}").decode("ascii")
            for index in range(1 + self.options.alternate_roots)
        ]

    def certificate_status(self, serial: int) -> dict[str, Any]:
        """Pebble's record of an issued certificate: ``Status`` ("Valid"/"Revoked"),
        ``Reason``, ``RevokedAt``."""
        raw = json.loads(self._management_get(f"/cert-status-by-serial/{serial:x}"))
        if not isinstance(raw, dict):
            raise PebbleError("cert-status-by-serial did not answer an object")
        return raw

    async def set_txt(self, fqdn: str, value: str) -> None:
        """Add ``value`` to the TXT record of ``fqdn`` (challtestsrv appends, it never
        replaces: clear first to change a value)."""
        async with ChallTestSrv(self.challtestsrv_url) as client:
            try:
                await client.set_txt(fqdn, value)
            except ChallTestSrvError as exc:
                raise PebbleError(str(exc)) from None

    async def clear_txt(self, fqdn: str) -> None:
        async with ChallTestSrv(self.challtestsrv_url) as client:
            try:
                await client.clear_txt(fqdn)
            except ChallTestSrvError as exc:
                raise PebbleError(str(exc)) from None
