"""Side by side with its peers: ``autotls run --once``, lego and certbot each issue a DNS-01
wildcard certificate from the same Pebble, as processes, in interleaved rounds (issue 11 §2).

Each run is one whole process timed from outside, start-up included:

* **autotls**: ``autotls run --once`` (the console script next to this interpreter) against the
  local stack -- Pebble with real DNS-01 validation, pebble-challtestsrv, and the local broker
  (PeerID auth, a real libp2p dial-back to the node, the TXT record published at
  challtestsrv); the broker runs inside this benchmark's process, so its CPU is not the
  child's. The bytecode of autotls's modules is written first, as ``pip install`` does
  (:func:`compile_autotls`).
* **lego** (Debian ``lego``): ``lego run`` with the ``exec`` DNS provider, a shell hook that
  calls challtestsrv's ``/set-txt`` and ``/clear-txt`` with curl, ``--dns.resolvers`` at
  challtestsrv and ``--dns.disable-cp``; ``EXEC_POLLING_INTERVAL=0``, because the exec provider
  otherwise sleeps a fixed 2 s before its first DNS check (an interval sized for real DNS
  providers; autotls and certbot check or validate at once).
* **certbot** (from PyPI, in its own virtualenv): ``certbot certonly --manual
  --preferred-challenges dns`` with auth and cleanup hooks calling challtestsrv the same way.

Every tool gets its CA file explicitly (``--ca-bundle``, ``LEGO_CA_CERTIFICATES``, certbot's
``REQUESTS_CA_BUNDLE``) and none of the machine's ``SSL_CERT_FILE``-style variables.
Every run asks for one identifier, ``*.<a new PeerID label>.libp2p.direct``, with each tool's
default key type (ECDSA P-256 for all three).

Accounts: ``new`` is a first run -- an empty data directory (autotls), ``--path`` (lego) or
``--config-dir`` (certbot), so each run registers a new ACME account. ``known`` is each tool's
normal later use: one directory per tool, whose account a warm-up run registered, reused for
every run -- for autotls the same data directory with a new identity key per run (``--key``),
so the order is new and the store's ACME account is reused. Each tool runs once per setting
before the rounds (not counted), which also warms the page cache.

Figures per tool and account mode: median and min-max over the runs of

* wall seconds, from spawning the process to reaping it;
* CPU seconds, user + system of the process and of every descendant it waited for (lego's and
  certbot's hooks, curl included): the ``rusage`` that ``os.wait4`` returns for the child;
* ACME requests per issuance, counted in Pebble's own log: Pebble 2.4.0 writes one line
  ``<METHOD> <route> -> calling handler()`` for every request to its ACME listener (before
  it checks the nonce, so a request rejected with ``badNonce`` and retried counts twice); its
  management listener logs nothing. The benchmark notes the log's size before each run and
  counts those lines written until the process is reaped; nothing else talks to Pebble
  meanwhile. The breakdown table splits them by route.

Both at each ``--nonce-reject`` percentage (``PEBBLE_WFE_NONCEREJECT``; a new Pebble, broker
and challtestsrv per setting). The targets of issue 11 are printed next to the figures.

Tools are installed on demand (``--no-install`` only checks): lego with apt-get when root,
certbot with pip into ``.bench-venvs/certbot`` (``--venvs``); what cannot be installed is named
and the benchmark exits 2. ``--baseline FILE`` (an earlier ``--json`` output) prints the
earlier medians next to the new ones.

``python -m bench.peers [--runs 5] [--nonce-reject 0,20] [--tools autotls,lego,certbot]
[--accounts new,known] [--baseline FILE] [--keep DIR] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import Report, add_json_flag, emit

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("autotls", "lego", "certbot")
ACCOUNTS = ("new", "known")
RUN_TIMEOUT_S = 120.0
WARMUP_ATTEMPTS = 5
ZONE = "libp2p.direct"
LISTEN = ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/tls/sni/*.libp2p.direct/ws")
CERTBOT_REQUIREMENT = "certbot"
# The machine's CA variables (and tool-specific ones) never reach a child: every tool is
# given Pebble's CA file explicitly.
SCRUBBED_ENV = {
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NIX_SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "AWS_CA_BUNDLE",
}
SCRUBBED_PREFIXES = ("AUTOTLS_", "LEGO_", "EXEC_", "CERTBOT_", "PEBBLE_")

# Issue 11 §2: autotls run --once <= 2x lego's wall time, <= 1.0 s CPU per issuance;
# <= 10 ACME requests with a new account, <= 8 with a known one.
TARGET_WALL_VS_LEGO = 2.0
TARGET_CPU_S = 1.0
TARGET_REQUESTS = {"new": 10, "known": 8}
# lego's own work takes well under a second here; a run this long waited out its ~5 s
# authorization re-poll (its first poll came before Pebble had validated).
LEGO_SLOW_POLL_S = 4.0

# Pebble 2.4.0's ACME routes (wfe.go), named as RFC 8555 names the resources.
_ROUTE_NAMES = {
    "/dir": "directory",
    "/nonce-plz": "newNonce",
    "/sign-me-up": "newAccount",
    "/my-account/": "acctURL",
    "/order-plz": "newOrder",
    "/authZ/": "authz",
    "/chalZ/": "challenge",
    "/finalize-order/": "finalize",
    "/my-order/": "order",
    "/certZ/": "certificate",
}
BREAKDOWN = (*_ROUTE_NAMES.values(), "other")
_REQUEST_LINE = re.compile(rb" (GET|HEAD|POST|PUT|DELETE|OPTIONS) (\S+) -> calling handler\(\)")


class Missing(RuntimeError):
    """A tool the benchmark needs is absent and could not be installed."""


# -- counting requests in Pebble's log -----------------------------------------------------------


class PebbleLog:
    """Pebble's log file, read from marked offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size

    def requests_since(self, offset: int) -> Counter[str]:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            text = fh.read()
        counts: Counter[str] = Counter()
        for match in _REQUEST_LINE.finditer(text):
            route = match.group(2).decode("ascii", "replace")
            counts[_ROUTE_NAMES.get(route, "other")] += 1
        return counts


# -- installing and finding the tools ------------------------------------------------------------


def _apt_install(package: str) -> None:
    """apt-get install as root, with one apt-get update when the package lists are stale."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=False)


def ensure_debian(command: str, package: str, install: bool) -> str:
    found = shutil.which(command)
    if found is None and install:
        print(f"[peers] installing {package} with apt-get", file=sys.stderr, flush=True)
        _apt_install(package)
        found = shutil.which(command)
    if found is None:
        raise Missing(
            f"{command} is not on PATH: install the Debian package {package} "
            f"(apt-get install {package}; as root, this benchmark does it itself)"
        )
    return found


def ensure_certbot(venvs: Path, install: bool) -> Path:
    venv = venvs / "certbot"
    certbot = venv / "bin" / "certbot"
    if certbot.exists():
        return certbot
    if not install:
        raise Missing(f"certbot is not installed in {venv}")
    print(f"[peers] installing certbot into {venv} (pip)", file=sys.stderr, flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", CERTBOT_REQUIREMENT],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise Missing(
                f"could not install certbot into {venv} ({' '.join(step[:4])} ... exited "
                f"{done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}"
            )
    if not certbot.exists():
        raise Missing(f"pip installed certbot, but {certbot} is not there")
    return certbot


def default_venvs() -> Path:
    return Path(os.environ.get("AUTOTLS_BENCH_VENVS") or ROOT / ".bench-venvs").resolve()


def autotls_command() -> list[str]:
    """The console script installed next to this interpreter, as an operator runs it."""
    script = Path(sys.executable).with_name("autotls")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "autotls"]


def _version(argv: Sequence[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _debian_version(package: str) -> str:
    if shutil.which("dpkg-query") is None:
        return "?"
    return _version(["dpkg-query", "-W", "-f", "${Version}\n", package])


# -- one measured process ------------------------------------------------------------------------


@dataclass
class Measured:
    code: int
    wall: float
    cpu: float
    timed_out: bool


# Children being measured (their process group ids): killed if the benchmark stops early.
_RUNNING: set[int] = set()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_measured(argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> Measured:
    """Spawn, wait, reap with ``os.wait4``: wall from spawn to reap, CPU of the process tree
    it waited for. Blocking: call it in a thread so the local broker keeps serving."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        _RUNNING.add(proc.pid)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(proc.pid)

        timer = threading.Timer(RUN_TIMEOUT_S, expire)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        _kill_group(proc.pid)  # anything it left running in its own group
        _RUNNING.discard(proc.pid)
    return Measured(proc.returncode, wall, usage.ru_utime + usage.ru_stime, expired.is_set())


# -- the tools -----------------------------------------------------------------------------------


@dataclass
class Setting:
    """What every tool needs from one running stack."""

    directory_url: str
    ca_file: Path
    roots_file: Path
    challtestsrv_url: str
    dns_server: str
    broker_url: str
    hooks: Path


def child_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SCRUBBED_ENV and not k.startswith(SCRUBBED_PREFIXES)
    }
    env.update(extra)
    return env


# The hooks a user of lego or certbot writes for a DNS provider with an HTTP API; here the API
# is challtestsrv's (a host without its trailing dot is never served: the names carry it).
_POST = (
    'exec curl -sS --fail --noproxy "*" -H "Content-Type: application/json"'
    ' -d "$body" "@URL@/$path"\n'
)
HOOKS = {
    # lego's exec provider: $1 = present|cleanup, $2 = the FQDN (dotted), $3 = the value
    "lego-exec": """#!/bin/sh
case "$1" in
  present) path=set-txt; body=$(printf '{"host":"%s","value":"%s"}' "$2" "$3") ;;
  cleanup) path=clear-txt; body=$(printf '{"host":"%s"}' "$2") ;;
  *) exit 0 ;;
esac
"""
    + _POST,
    # certbot: CERTBOT_DOMAIN is the name without "*.", CERTBOT_VALIDATION the TXT value
    "certbot-auth": """#!/bin/sh
path=set-txt
body=$(printf '{"host":"_acme-challenge.%s.","value":"%s"}' "$CERTBOT_DOMAIN" \\
  "$CERTBOT_VALIDATION")
"""
    + _POST,
    "certbot-cleanup": """#!/bin/sh
path=clear-txt
body=$(printf '{"host":"_acme-challenge.%s."}' "$CERTBOT_DOMAIN")
"""
    + _POST,
}


def write_hooks(directory: Path, challtestsrv_url: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in HOOKS.items():
        path = directory / name
        path.write_text(text.replace("@URL@", challtestsrv_url))
        path.chmod(0o755)


@dataclass
class Invocation:
    argv: list[str]
    env: dict[str, str]
    certificate: Path | None  # where the certificate must be afterwards (None: from output)


def lego_invocation(lego: str, s: Setting, home: Path, label: str) -> Invocation:
    argv = [
        lego,
        "--server", s.directory_url,
        "--accept-tos",
        "--email", "bench@example.org",
        "--domains", f"*.{label}.{ZONE}",
        "--dns", "exec",
        "--dns.resolvers", s.dns_server,
        "--dns.disable-cp",
        "--path", str(home),
        "run",
    ]  # fmt: skip
    env = child_env(
        LEGO_CA_CERTIFICATES=str(s.ca_file),
        EXEC_PATH=str(s.hooks / "lego-exec"),
        EXEC_POLLING_INTERVAL="0",
    )
    return Invocation(argv, env, home / "certificates" / f"_.{label}.{ZONE}.crt")


def certbot_invocation(certbot: Path, s: Setting, home: Path, label: str) -> Invocation:
    argv = [
        str(certbot), "certonly",
        "--non-interactive",
        "--agree-tos",
        "--register-unsafely-without-email",
        "--server", s.directory_url,
        "--config-dir", str(home / "config"),
        "--work-dir", str(home / "work"),
        "--logs-dir", str(home / "logs"),
        "--manual",
        "--preferred-challenges", "dns",
        "--manual-auth-hook", str(s.hooks / "certbot-auth"),
        "--manual-cleanup-hook", str(s.hooks / "certbot-cleanup"),
        "-d", f"*.{label}.{ZONE}",
    ]  # fmt: skip
    env = child_env(REQUESTS_CA_BUNDLE=str(s.ca_file))
    return Invocation(argv, env, home / "config" / "live" / f"{label}.{ZONE}" / "fullchain.pem")


def autotls_invocation(
    command: Sequence[str], s: Setting, data_dir: Path, key: Path | None
) -> Invocation:
    argv = [
        *command, "run", "--once",
        "--data-dir", str(data_dir),
        "--ca", s.directory_url,
        "--ca-bundle", str(s.ca_file),
        "--trust-roots", str(s.roots_file),
        "--broker", s.broker_url,
        "--dns-server", s.dns_server,
        "--allow-private-addresses",
        "--listen", *LISTEN,
    ]  # fmt: skip
    if key is not None:
        argv += ["--key", str(key)]
    return Invocation(argv, child_env(), None)


_LOADED = re.compile(r"certificate loaded: \*\.([0-9a-z]+)\." + re.escape(ZONE))


def issued_certificate(tool: str, inv: Invocation, home: Path, output: str) -> Path | None:
    if inv.certificate is not None:
        return inv.certificate
    found = _LOADED.search(output) if tool == "autotls" else None
    return home / "certs" / found.group(1) / "fullchain.pem" if found else None


# -- the rounds ----------------------------------------------------------------------------------


@dataclass
class Sample:
    nonce_reject: int
    tool: str
    accounts: str
    round: int
    ok: bool
    wall: float
    cpu: float
    requests: Counter[str] = field(default_factory=Counter)
    error: str | None = None

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass
class Tools:
    autotls: list[str]
    lego: str
    certbot: Path
    versions: dict[str, str]


def find_tools(wanted: Sequence[str], venvs: Path, install: bool) -> Tools:
    """Everything the chosen tools need, installed on demand; :class:`Missing` lists what is
    absent."""
    from autotls.localstack.pebble import pebble_available

    problems: list[str] = []
    if not pebble_available():
        problems.append(
            "pebble and pebble-challtestsrv are not on PATH (Debian package pebble; "
            "scripts/setup installs it)"
        )
    lego, certbot = "", Path()
    versions = {"pebble": _debian_version("pebble")}
    if "lego" in wanted or "certbot" in wanted:
        try:
            ensure_debian("curl", "curl", install)  # the DNS hooks call challtestsrv
        except Missing as exc:
            problems.append(str(exc))
    if "lego" in wanted:
        try:
            lego = ensure_debian("lego", "lego", install)
            versions["lego"] = _debian_version("lego")
        except Missing as exc:
            problems.append(str(exc))
    if "certbot" in wanted:
        try:
            certbot = ensure_certbot(venvs, install)
            versions["certbot"] = _version([str(certbot), "--version"])
        except Missing as exc:
            problems.append(str(exc))
    command = autotls_command()
    if "autotls" in wanted:
        if importlib.util.find_spec("libp2p") is None:
            problems.append(
                "py-libp2p is not installed in this interpreter (the libp2p extra): the "
                "local broker dials the node back with it"
            )
        versions["autotls"] = _version([*command, "--version"])
        compile_autotls()
    if problems:
        raise Missing("; ".join(problems))
    return Tools(command, lego, certbot, versions)


def compile_autotls() -> None:
    """Write the bytecode of this autotls's modules, as ``pip install`` does for an
    installed package (certbot's virtualenv has it; lego is a binary). A source checkout run
    under ``PYTHONDONTWRITEBYTECODE=1`` (this machine's default) would otherwise compile
    some eighty modules from source in every run, ~0.1 s of CPU that no installation pays.
    ``fsm``, ``persistence`` and ``migrations`` are symbolic links in a checkout, hence the
    walk that follows them (``compileall`` does not); up-to-date files are left alone."""
    import compileall

    spec = importlib.util.find_spec("autotls")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        for folder, _, names in os.walk(root, followlinks=True):
            for name in sorted(names):
                if name.endswith(".py"):
                    compileall.compile_file(os.path.join(folder, name), quiet=2)


def _order(pairs: list[tuple[str, str]], round_no: int) -> list[tuple[str, str]]:
    """The round's running order, rotated each round so no tool always goes first."""
    shift = round_no % len(pairs)
    return pairs[shift:] + pairs[:shift]


def _progress(text: str) -> None:
    print(f"[peers] {text}", file=sys.stderr, flush=True)


async def run_setting(
    tools: Tools,
    nonce_reject: int,
    runs: int,
    wanted: Sequence[str],
    accounts: Sequence[str],
    workdir: Path,
) -> list[Sample]:
    from autotls.localstack.pebble import PebbleOptions
    from autotls.localstack.stack import LocalStack
    from autotls.peerid import PrivateKey

    samples: list[Sample] = []
    async with LocalStack(
        workdir / "stack", pebble_options=PebbleOptions(nonce_reject_percent=nonce_reject)
    ) as stack:
        roots = workdir / "pebble-roots.pem"
        roots.write_text("".join(stack.pebble.issuer_roots_pem()))
        setting = Setting(
            directory_url=stack.pebble.directory_url,
            ca_file=stack.pebble.ca_file,
            roots_file=roots,
            challtestsrv_url=stack.pebble.challtestsrv_url,
            dns_server=stack.dns_server,
            broker_url=stack.broker_url,
            hooks=workdir / "hooks",
        )
        write_hooks(setting.hooks, setting.challtestsrv_url)
        pebble_log = PebbleLog(stack.pebble.workdir / "pebble.log")

        async def one(tool: str, mode: str, tag: str) -> Sample:
            # A new identifier per run, shaped like autotls's own: a PeerID's base36 label.
            label = PrivateKey.generate().peer_id.to_base36()
            run_dir = workdir / "runs" / tag
            run_dir.mkdir(parents=True)
            home = workdir / "known" / tool if mode == "known" else run_dir / "home"
            home.mkdir(parents=True, exist_ok=True)
            if tool == "lego":
                inv = lego_invocation(tools.lego, setting, home, label)
            elif tool == "certbot":
                inv = certbot_invocation(tools.certbot, setting, home, label)
            else:
                key = run_dir / "identity.key" if mode == "known" else None
                inv = autotls_invocation(tools.autotls, setting, home, key)
            log = run_dir / "output.log"
            mark = pebble_log.mark()
            measured = await asyncio.to_thread(run_measured, inv.argv, inv.env, run_dir, log)
            requests = pebble_log.requests_since(mark)
            output = log.read_text(errors="replace")
            cert = issued_certificate(tool, inv, home, output)
            error = None
            if measured.timed_out:
                error = f"killed after {RUN_TIMEOUT_S:g} s"
            elif measured.code != 0:
                error = f"exit {measured.code}"
            elif cert is None or not cert.is_file():
                error = f"exit 0 but no certificate at {cert or '(none named in its output)'}"
            elif requests["newOrder"] == 0 or requests["certificate"] == 0:
                error = "no newOrder/certificate request in Pebble's log (did its format change?)"
            if error is not None:
                tail = " | ".join(output.strip().splitlines()[-3:])
                error = f"{error}: {tail}"[:400]
            return Sample(
                nonce_reject, tool, mode, -1, error is None, measured.wall, measured.cpu,
                requests, error,
            )  # fmt: skip

        pairs = [(t, a) for t in wanted for a in accounts]
        # Warm-up, not counted: registers each tool's known account, fills the page cache.
        # A tool may fail it under nonce rejection (certbot retries a badNonce only once):
        # try again, since the known account must exist before the rounds.
        for tool in wanted:
            mode = "known" if "known" in accounts else "new"
            for attempt in range(1, WARMUP_ATTEMPTS + 1):
                warm = await one(tool, mode, f"warmup-{tool}-{attempt}")
                _progress(
                    f"{nonce_reject}% warm-up {tool}: {warm.wall:.2f} s"
                    + ("" if warm.ok else f" FAILED {warm.error}")
                )
                if warm.ok:
                    break
            else:
                raise RuntimeError(
                    f"{tool}'s warm-up failed {WARMUP_ATTEMPTS} times, last: {warm.error}"
                )
        for round_no in range(runs):
            for tool, mode in _order(pairs, round_no):
                sample = await one(tool, mode, f"r{round_no}-{tool}-{mode}")
                sample.round = round_no
                samples.append(sample)
                _progress(
                    f"{nonce_reject}% round {round_no + 1}/{runs} {tool:7} {mode:5}: "
                    f"{sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU, "
                    f"{sample.total_requests} requests"
                    + ("" if sample.ok else f" FAILED {sample.error}")
                )
    return samples


# -- figures -------------------------------------------------------------------------------------


def _span(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cells(group: Sequence[Sample]) -> dict[str, Any]:
    ok = [s for s in group if s.ok]
    walls = [s.wall for s in ok]
    cpus = [s.cpu for s in ok]
    reqs = [float(s.total_requests) for s in ok]
    return {
        "ok": f"{len(ok)}/{len(group)}",
        "wall s": _median(walls),
        "wall min-max": _span(walls),
        "CPU s": _median(cpus),
        "CPU min-max": _span(cpus),
        "ACME req": _median(reqs),
        "req min-max": _span(reqs, 0),
        # every sample, for comparisons (JSON only)
        "wall_s_runs": [round(v, 4) for v in walls],
        "cpu_s_runs": [round(v, 4) for v in cpus],
        "requests_runs": [int(v) for v in reqs],
        "failures": [s.error for s in group if not s.ok],
    }


def _groups(samples: Sequence[Sample]) -> dict[tuple[int, str, str], list[Sample]]:
    groups: dict[tuple[int, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.nonce_reject, s.tool, s.accounts), []).append(s)
    return groups


def _ratio_per_round(samples: Sequence[Sample], nonce: int, mode: str) -> list[float]:
    """autotls / lego wall time, paired within each round (the machine's speed drifts)."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        if s.ok and s.nonce_reject == nonce and s.accounts == mode:
            by_round.setdefault(s.round, {})[s.tool] = s.wall
    return [r["autotls"] / r["lego"] for r in by_round.values() if {"autotls", "lego"} <= set(r)]


def reports(
    samples: Sequence[Sample],
    params: dict[str, Any],
    baseline: dict[tuple[int, str, str], dict[str, Any]] | None,
) -> list[Report]:
    groups = _groups(samples)
    figures = Report(
        "peers: one DNS-01 wildcard issuance per process, interleaved (same Pebble)",
        ["nonce rej %", "tool", "account", "ok", "wall s", "wall min-max", "CPU s",
         "CPU min-max", "ACME req", "req min-max"],
        params=params,
    )  # fmt: skip
    for (nonce, tool, mode), group in groups.items():
        figures.add(**{"nonce rej %": nonce, "tool": tool, "account": mode}, **_cells(group))
    figures.notes += [
        "medians (min-max) over the runs that issued; wall: spawn to reap; CPU: user+sys of"
        " the process and the descendants it waited for (os.wait4)",
        "ACME req: lines '<METHOD> <route> -> calling handler()' Pebble logged during the run"
        " (a badNonce rejection and its retry count twice)",
        "autotls: the local broker (PeerID auth, libp2p dial-back, TXT publish) runs in the"
        " benchmark's process: its CPU is not in the autotls figures",
        "lego: exec DNS provider, EXEC_POLLING_INTERVAL=0; when its first authorization poll"
        " finds the authorization still pending, the next poll comes ~5 s later: the slow"
        " runs in its min-max",
    ]
    for (nonce, tool, mode), group in groups.items():
        failed = [s for s in group if not s.ok]
        if failed:
            figures.notes.append(
                f"{tool} ({mode} account, {nonce} % nonce rejection): {len(failed)} of"
                f" {len(group)} runs did not issue; first: {failed[0].error}"
            )

    breakdown = Report(
        "peers: ACME requests per issuance by route (mean of the runs that issued)",
        ["nonce rej %", "tool", "account", *BREAKDOWN, "total"],
    )
    for (nonce, tool, mode), group in groups.items():
        ok = [s for s in group if s.ok]
        if not ok:
            continue
        breakdown.add(
            **{"nonce rej %": nonce, "tool": tool, "account": mode},
            **{name: f"{statistics.mean(s.requests[name] for s in ok):.3g}" for name in BREAKDOWN},
            total=f"{statistics.mean(s.total_requests for s in ok):.3g}",
        )
    breakdown.notes.append(
        "means, so the routes add up to the total: directory GET, newNonce HEAD, then POSTs"
        " (Pebble's /dir, /nonce-plz, /sign-me-up, /my-account/, /order-plz, /authZ/,"
        " /chalZ/, /finalize-order/, /my-order/, /certZ/)"
    )

    targets = Report(
        "peers: issue 11 targets for `autotls run --once` next to the figures",
        ["nonce rej %", "account", "target", "figure", "met"],
    )
    nonces = sorted({s.nonce_reject for s in samples})
    modes = [m for m in ACCOUNTS if any(s.accounts == m for s in samples)]
    for nonce in nonces:
        for mode in modes:
            auto = [s for s in groups.get((nonce, "autotls", mode), []) if s.ok]
            lego = [s for s in groups.get((nonce, "lego", mode), []) if s.ok]
            if not auto:
                continue
            if lego:
                auto_wall = _median([s.wall for s in auto])
                lego_wall = _median([s.wall for s in lego])
                ratio = auto_wall / lego_wall
                pairs = _ratio_per_round(samples, nonce, mode)
                targets.add(
                    **{"nonce rej %": nonce, "account": mode},
                    target=f"wall <= {TARGET_WALL_VS_LEGO:g}x lego",
                    figure=f"{ratio:.1f}x ({auto_wall:.2f} s / {lego_wall:.2f} s;"
                    f" pairs {_span(pairs, 1)}x)",
                    met="yes" if ratio <= TARGET_WALL_VS_LEGO else "no",
                )
                brisk = [s.wall for s in lego if s.wall < LEGO_SLOW_POLL_S]
                if brisk and len(brisk) < len(lego):
                    ratio = auto_wall / _median(brisk)
                    targets.add(
                        **{"nonce rej %": nonce, "account": mode},
                        target=f"wall <= {TARGET_WALL_VS_LEGO:g}x lego w/o its 5 s poll",
                        figure=f"{ratio:.1f}x ({auto_wall:.2f} s / {_median(brisk):.2f} s;"
                        f" {len(brisk)} of {len(lego)} lego runs)",
                        met="yes" if ratio <= TARGET_WALL_VS_LEGO else "no",
                    )
            cpu = _median([s.cpu for s in auto])
            targets.add(
                **{"nonce rej %": nonce, "account": mode},
                target=f"CPU <= {TARGET_CPU_S:g} s",
                figure=f"{cpu:.2f} s ({_span([s.cpu for s in auto])})",
                met="yes" if cpu <= TARGET_CPU_S else "no",
            )
            reqs = _median([float(s.total_requests) for s in auto])
            limit = TARGET_REQUESTS[mode]
            targets.add(
                **{"nonce rej %": nonce, "account": mode},
                target=f"ACME requests <= {limit}" if nonce == 0 else "ACME requests (printed)",
                figure=f"{reqs:g} ({_span([float(s.total_requests) for s in auto], 0)})",
                met=("yes" if reqs <= limit else "no") if nonce == 0 else "-",
            )
    targets.notes.append(
        "wall: autotls's median over lego's median (pairs: autotls/lego within each round);"
        " 'w/o its 5 s poll': only lego's runs under 4 s, i.e. whose first authorization poll"
        " found it valid; the request targets are for 0 % nonce rejection, other settings"
        " print the count"
    )

    out = [figures, breakdown, targets]
    if baseline is not None:
        compared = Report(
            "peers: medians against the baseline (before -> now)",
            ["nonce rej %", "tool", "account", "wall s", "CPU s", "ACME req"],
            params={"baseline": params.get("baseline")},
        )
        for key, group in groups.items():
            before = baseline.get(key)
            if before is None:
                continue
            now = _cells(group)
            compared.add(
                **{"nonce rej %": key[0], "tool": key[1], "account": key[2]},
                **{
                    col: f"{_fmt(before.get(col))} -> {_fmt(now[col])}"
                    for col in ("wall s", "CPU s", "ACME req")
                },
            )
        out.append(compared)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def load_baseline(path: Path) -> dict[tuple[int, str, str], dict[str, Any]]:
    """The per-tool rows of an earlier ``python -m bench.peers --json`` output."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--baseline {path}: not a readable JSON file: {exc}") from None
    for report in data if isinstance(data, list) else []:
        if isinstance(report, dict) and str(report.get("title", "")).startswith("peers: one"):
            return {
                (int(r["nonce rej %"]), str(r["tool"]), str(r["account"])): r
                for r in report.get("rows", [])
            }
    raise ValueError(f"--baseline {path}: no peers figures in it (not a --json output?)")


async def run(
    tools: Tools,
    runs: int,
    nonce_rejects: Sequence[int],
    wanted: Sequence[str],
    accounts: Sequence[str],
    keep: Path | None,
) -> list[Sample]:
    samples: list[Sample] = []
    with contextlib.ExitStack() as stack:
        if keep is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peers-")))
        else:
            base = keep
            base.mkdir(parents=True, exist_ok=True)
        try:
            for nonce in nonce_rejects:
                workdir = base / f"nonce-{nonce}"
                if workdir.exists():
                    shutil.rmtree(workdir)
                samples += await run_setting(tools, nonce, runs, wanted, accounts, workdir)
        finally:
            for pgid in list(_RUNNING):  # interrupted mid-run: its thread is still waiting
                _kill_group(pgid)
    return samples


def collect(
    tools: Tools,
    runs: int,
    nonce_rejects: Sequence[int],
    wanted: Sequence[str] = TOOLS,
    accounts: Sequence[str] = ACCOUNTS,
    *,
    keep: Path | None = None,
    baseline_path: Path | None = None,
) -> list[Report]:
    """Run the rounds and return the printed reports (also ``bench.run_all``'s entry)."""
    baseline = load_baseline(baseline_path) if baseline_path is not None else None
    samples = asyncio.run(run(tools, runs, nonce_rejects, wanted, accounts, keep))
    params: dict[str, Any] = {
        "runs": runs,
        "nonce_reject": list(nonce_rejects),
        "versions": tools.versions,
    }
    if baseline_path is not None:
        params["baseline"] = str(baseline_path)
    return reports(samples, params, baseline)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=5, help="measured runs per tool and mode")
    parser.add_argument("--nonce-reject", default="0,20", help="Pebble's badNonce percentages")
    parser.add_argument("--tools", default=",".join(TOOLS), help="among: autotls, lego, certbot")
    parser.add_argument("--accounts", default=",".join(ACCOUNTS), help="among: new, known")
    parser.add_argument(
        "--venvs",
        type=Path,
        default=default_venvs(),
        help="where certbot's virtualenv lives (default .bench-venvs; env AUTOTLS_BENCH_VENVS)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="only check the tools, install nothing"
    )
    parser.add_argument(
        "--baseline", type=Path, help="an earlier --json output: print its medians next to these"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep every run's directory and output here (default: a temp)"
    )
    add_json_flag(parser)
    args = parser.parse_args(argv)
    wanted = _csv(args.tools)
    accounts = _csv(args.accounts)
    try:
        nonces = [int(n) for n in _csv(args.nonce_reject)]
    except ValueError:
        parser.error("--nonce-reject: comma-separated integers (percent)")
    if args.runs < 1:
        parser.error("--runs must be positive")
    if not wanted or set(wanted) - set(TOOLS):
        parser.error(f"--tools among: {', '.join(TOOLS)}")
    if not accounts or set(accounts) - set(ACCOUNTS):
        parser.error(f"--accounts among: {', '.join(ACCOUNTS)}")
    if not nonces or any(not 0 <= n <= 100 for n in nonces):
        parser.error("--nonce-reject: percentages between 0 and 100")
    if args.baseline is not None:
        try:
            load_baseline(args.baseline)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        tools = find_tools(wanted, args.venvs.resolve(), install=not args.no_install)
    except Missing as exc:
        print(f"bench.peers: missing: {exc}", file=sys.stderr)
        sys.exit(2)
    figures = collect(
        tools, args.runs, nonces, wanted, accounts, keep=args.keep, baseline_path=args.baseline
    )
    emit(figures, args.json)


if __name__ == "__main__":
    main()
