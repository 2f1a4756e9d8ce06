"""``fleche-remote info`` and ``doctor``: what a cache is, and what is wrong
with a remote set-up.

``info HOST|CACHE`` prints what :meth:`SshCache.info` reports (for each ssh
layer of a stack), and the configuration of local layers.

``doctor HOST|CACHE`` walks the path a request takes and stops at nothing:
every check prints ``ok``, ``warn`` or ``FAIL``, each failure with a fix.
For every ssh layer:

1. **ssh and the remote Python**: one ``ssh`` running a small probe with
   the layer's ``workdir``, ``setup_commands`` and ``python``; it reports
   the interpreter, whether fleche_remote imports there (and which
   version), and which fleche.toml it finds from where. A key whose
   ``authorized_keys`` forces a command answers with the server instead;
   those checks are then made through the server;
2. **the server**: the handshake, timed; the cache it serves, its type,
   read-only or not, the bootstrap state when the server says, and what
   the login shell printed before the banner (noise is tolerated, but it
   slows every start and may hide an error);
3. **the link**: ``ping`` round trips (median of :data:`PINGS`), and the
   throughput each way through the layer's own ssh command (cipher
   included), moving ``--bytes`` of zeros to ``/dev/null`` and back.

With ControlMaster set (see README), all of this costs one login.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..caches.base import BaseCache
from ..progress import human_bytes
from .common import add_cache_options, layers_of, open_cache, table

#: Round trips timed for the latency check.
PINGS = 20

#: Bytes moved each way by the throughput check (``--bytes``).
THROUGHPUT_BYTES = 16 << 20

_PROBE_MARK = "FLECHE-DOCTOR "
_READY_MARK = b"FLECHE-DOCTOR-READY\n"

# Runs on the remote with its python: stdlib only, and never fails.
_PROBE = r"""
import json, os, sys
out = {"python": sys.executable, "version": sys.version.split()[0], "cwd": os.getcwd()}
try:
    import fleche_remote
    out["package"] = getattr(fleche_remote, "__version__", "?")
    out["package_file"] = getattr(fleche_remote, "__file__", "?")
    try:
        from fleche_remote.config import load_config
        cfg = load_config()
        out["config_files"] = [str(p) for p in cfg.files]
        out["config_searched"] = [str(p) for p in cfg.searched]
    except Exception as exc:
        out["config_error"] = "%s: %s" % (type(exc).__name__, exc)
except Exception as exc:
    out["package_error"] = "%s: %s" % (type(exc).__name__, exc)
    # no package to ask: the fleche.toml files above the working directory
    found, d = [], os.getcwd()
    while True:
        if os.path.isfile(os.path.join(d, "fleche.toml")):
            found.append(os.path.join(d, "fleche.toml"))
        if os.path.dirname(d) == d:
            break
        d = os.path.dirname(d)
    out["config_files_above"] = found
print("FLECHE-DOCTOR " + json.dumps(out))
"""


def _flatten(data: Any, prefix: str = "") -> List[Tuple[str, str]]:
    if isinstance(data, dict) and data:
        rows: List[Tuple[str, str]] = []
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        rows = []
        for i, value in enumerate(data):
            rows += _flatten(value, f"{prefix}[{i}]")
        return rows
    return [(prefix, data if isinstance(data, str) else json.dumps(data, default=str))]


def _layer_info(layer: BaseCache) -> Dict[str, Any]:
    from ..config import cache_to_config, redact
    from ..remote.client import SshCache

    if isinstance(layer, SshCache):
        info = dict(layer.info())
        noise = layer.login_noise
        info["login_noise"] = noise.decode("utf-8", "replace") if noise else ""
        return {"host": layer.host, **info}
    try:
        described: Any = redact(cache_to_config(layer))
    except Exception:
        described = layer.describe()
    return {"cache": described, "read_only": layer.read_only}


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    """A table of what each layer is (for ssh layers: what the server says)."""
    opened = open_cache(args.target, args, any_host=True)
    try:
        layers = layers_of(opened.cache)
        infos = [_layer_info(layer) for layer in layers]
    finally:
        opened.close()
    if args.json:
        json.dump(infos[0] if len(infos) == 1 else infos, out, indent=1, default=str)
        out.write("\n")
        return 0
    for depth, info in enumerate(infos):
        if len(infos) > 1:
            out.write(f"{'' if depth == 0 else chr(10)}layer {depth}\n")
        table([[k, v] for k, v in _flatten(info)], out)
    return 0


# -- doctor --------------------------------------------------------------------------


@dataclass
class Report:
    """Checks as they are made, printed as they come."""

    out: TextIO
    results: List[Dict[str, Any]] = field(default_factory=list)
    quiet: bool = False

    def add(self, status: str, check: str, detail: str, fix: str = "") -> None:
        self.results.append({"status": status, "check": check, "detail": detail, "fix": fix})
        if self.quiet:
            return
        label = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}[status]
        self.out.write(f"  {label:<5} {check:<12} {detail}\n")
        if fix:
            self.out.write(f"        {'':<12} fix: {fix}\n")
        self.out.flush()

    @property
    def failed(self) -> int:
        return sum(r["status"] == "fail" for r in self.results)


def _ssh_argv(layer: Any, remote: str) -> List[str]:
    """``remote`` run by ``layer``'s own ssh command line, after its ``cd``
    and setup commands: doctor tests what the cache itself would run."""
    return list(layer.ssh_argv(" && ".join([*layer.setup_steps(), remote])))


def _probe(layer: Any, report: Report) -> Optional[Dict[str, Any]]:
    """Step 1: ssh + python + package + config, in one login. None when the
    key ran a forced command (the server) instead of the probe."""
    import shlex

    from ..remote.ssh_options import sh_path

    remote = f"{sh_path(layer.python)} -c {shlex.quote(_PROBE)}"
    started = time.perf_counter()
    try:
        done = subprocess.run(
            _ssh_argv(layer, remote),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=layer.connect_timeout,
        )
    except subprocess.TimeoutExpired:
        report.add(
            "fail",
            "ssh",
            f"no answer from {layer.host} within {layer.connect_timeout:g} s",
            "check that `ssh HOST true` works by hand; raise connect_timeout for a slow 2FA",
        )
        return None
    except OSError as exc:
        report.add("fail", "ssh", f"cannot run {layer.ssh!r}: {exc}", "install OpenSSH's client (ssh)")
        return None
    elapsed = time.perf_counter() - started
    stdout = done.stdout.decode("utf-8", "replace")
    stderr = done.stderr.decode("utf-8", "replace").strip().splitlines()
    last = stderr[-1] if stderr else f"exit code {done.returncode}"
    if done.returncode == 255:
        report.add(
            "fail",
            "ssh",
            f"ssh could not log in to {layer.host}: {last}",
            "check the host name, user and key (`ssh -v HOST true`); behind 2FA, set ControlMaster",
        )
        return None
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_PROBE_MARK)), None)
    if line is None:
        if "FLECHE" in stdout or "fleche" in stdout.lower():
            report.add("ok", "ssh", f"logged in to {layer.host} in {elapsed:.2f} s")
            report.add(
                "skip",
                "python",
                "this key runs a forced command (the server); checked through the server below",
            )
            return None
        report.add("ok", "ssh", f"logged in to {layer.host} in {elapsed:.2f} s")
        if done.returncode == 127:
            report.add(
                "fail",
                "python",
                f"{layer.python!r} or a setup command was not found on {layer.host}: {last}",
                "set python = '/full/path/to/python3' or fix setup_commands (module load, venv)",
            )
        else:
            report.add(
                "fail",
                "python",
                f"the probe did not run with {layer.python!r} (exit {done.returncode}): {last}",
                "check workdir and setup_commands: each must succeed in a non-interactive shell",
            )
        return None
    probe: Dict[str, Any] = json.loads(line[len(_PROBE_MARK) :])
    report.add("ok", "ssh", f"logged in to {layer.host} and ran the probe in {elapsed:.2f} s")
    major_minor = tuple(int(p) for p in probe["version"].split(".")[:2])
    if major_minor < (3, 9):
        report.add(
            "fail",
            "python",
            f"{probe['python']} is Python {probe['version']}",
            "fleche-remote needs Python 3.9 or later: point python at a newer one",
        )
    else:
        report.add("ok", "python", f"{probe['python']} (Python {probe['version']})")
    return probe


def _check_package(
    layer: Any, probe: Optional[Dict[str, Any]], info: Optional[Dict[str, Any]], report: Report
) -> None:
    from .. import __version__

    # the server's own word on how it runs, when it gives one; else the layer's setting
    boot = (info or {}).get("bootstrap") or getattr(layer, "bootstrap", None)
    mode = f"; bootstrap = {boot}" if boot else ""
    if probe is not None and "package" in probe:
        same = probe["package"] == __version__
        shipped = not same and info is not None and boot not in (None, "never")
        report.add(
            "ok" if same or shipped else "warn",
            "package",
            f"fleche-remote {probe['package']} at {probe['package_file']} (this client: {__version__}{mode})"
            + ("; the server runs the code this client sent" if shipped else ""),
            ""
            if same or shipped
            else f"pip install 'fleche-remote=={__version__}' there, or set bootstrap = 'auto'",
        )
    elif probe is not None:
        if info is not None:
            report.add("ok", "package", f"not installed; the server runs the code this client sent{mode}")
        else:
            report.add(
                "fail",
                "package",
                f"fleche_remote does not import there: {probe.get('package_error')}",
                "`fleche-remote install HOST`, or pip install fleche-remote in the remote's environment",
            )
    elif info is not None:
        versions = info.get("versions", {})
        report.add(
            "ok",
            "package",
            f"server runs fleche-remote {versions.get('library')} (this client: {__version__})",
        )


def _check_config(probe: Optional[Dict[str, Any]], info: Optional[Dict[str, Any]], report: Report) -> None:
    files = (probe or {}).get("config_files")
    cwd = (probe or {}).get("cwd") or (info or {}).get("cwd")
    if files is None and info is not None:
        files = info.get("config_files")
    if files:
        report.add("ok", "fleche.toml", f"{', '.join(files)} (looked from {cwd})")
    elif files is not None:
        searched = ", ".join((probe or {}).get("config_searched", [])) or "?"
        report.add(
            "warn" if info is not None else "fail",
            "fleche.toml",
            f"none found from {cwd} (looked at {searched})",
            "put a fleche.toml in the remote workdir (or set workdir = to where it is)",
        )
    elif (probe or {}).get("config_files_above"):
        above = ", ".join(probe["config_files_above"])  # type: ignore[index]
        report.add("ok", "fleche.toml", f"{above} (above {cwd}; the closest one wins)")
    elif probe is not None and "config_error" in probe:
        report.add(
            "fail", "fleche.toml", probe["config_error"], "fix the remote's fleche.toml (see the error)"
        )
    else:
        report.add("skip", "fleche.toml", f"the server did not say which file it read (cwd {cwd})")


def _describe_cache(cache: Any) -> str:
    if isinstance(cache, list):
        return f"a stack of {len(cache)} layers"
    if isinstance(cache, dict):
        if "type" in cache:
            return f"type {cache['type']}"
        if "template" in cache:
            return f"template {cache['template']}" + (f", root {cache['root']}" if "root" in cache else "")
        parts = [f"{k} {v.get('type')}" for k, v in cache.items() if isinstance(v, dict) and "type" in v]
        if parts:
            return ", ".join(parts)
    return json.dumps(cache, default=str)[:80]


def _connect(layer: Any, report: Report) -> Optional[Dict[str, Any]]:
    """Step 2: the handshake and what the server says."""
    from ..errors import FlecheRemoteError

    started = time.perf_counter()
    try:
        info = dict(layer.info(refresh=False))
    except FlecheRemoteError as exc:
        report.add(
            "fail",
            "server",
            " ".join(str(exc).split())[:400],
            "run `ssh HOST` and start `python3 -m fleche_remote serve` by hand to see its error",
        )
        return None
    report.add("ok", "server", f"answered in {time.perf_counter() - started:.2f} s (pid {info.get('pid')})")
    return info


def _check_usage(layer: Any, report: Report) -> None:
    """The remote cache's size against the limits of its own fleche.toml."""
    from .usage import closeness

    try:
        usage = layer.usage_report()
    except Exception as exc:  # a size we cannot read is worth a warning, not a failed doctor
        report.add("warn", "size", f"could not measure: {' '.join(str(exc).split())[:200]}")
        return
    if usage is None:
        report.add("ok", "size", "not reported (an older server)")
        return
    from ..storage.quota import format_size

    status = "ok"
    limits = usage.get("limits") or {}
    if "max_bytes" in limits and usage["bytes"] > limits["max_bytes"]:
        status = "warn"
    report.add(
        status,
        "size",
        f"{usage['calls']} call(s), {format_size(usage['bytes'])}; {closeness(usage)}",
        "the server trims as it saves; `fleche-remote gc HOST --max-bytes SIZE` trims now",
    )


def _check_server(layer: Any, info: Dict[str, Any], report: Report) -> None:
    name = info.get("cache_name") or "[default]"
    report.add("ok", "cache", f"{name}: {_describe_cache(info.get('cache'))}")
    if info.get("read_only"):
        report.add("ok", "read-only", "yes: reads only; saves, evictions and gc are refused")
    else:
        report.add("ok", "read-only", "no: saves are accepted")
    _check_usage(layer, report)
    noise = layer.login_noise
    if noise:
        text = noise.decode("utf-8", "replace").strip().splitlines()
        first = text[0][:60] if text else ""
        report.add(
            "warn",
            "login noise",
            f"{len(noise)} bytes before the banner ({len(text)} lines), first: {first!r}",
            "make the remote shell quiet when not interactive, e.g. `[[ $- == *i* ]] || return` "
            "at the top of ~/.bashrc, before what prints",
        )
    else:
        report.add("ok", "login noise", "none")


def _check_latency(layer: Any, report: Report) -> None:
    times = []
    for _ in range(PINGS):
        started = time.perf_counter()
        layer.ping()
        times.append(time.perf_counter() - started)
    median = statistics.median(times) * 1000
    report.add(
        "ok", "latency", f"{median:.1f} ms round trip (median of {PINGS}, max {max(times) * 1000:.1f} ms)"
    )


def _stream(layer: Any, remote: str, send: int, receive: int) -> Optional[float]:
    from ..remote.protocol import MAGIC

    """Seconds to move ``send`` bytes up or ``receive`` bytes down through the
    layer's ssh, timed from the remote's ready mark; None when the remote
    never printed it (a forced command ran instead)."""
    proc = subprocess.Popen(
        _ssh_argv(layer, remote),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    killer = threading.Timer(layer.connect_timeout + layer.timeout, proc.kill)
    killer.start()
    try:
        seen = b""
        while _READY_MARK not in seen:
            data = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not data:
                return None
            # keep what may hold a mark split across reads, not the noise before it
            seen = seen[-len(_READY_MARK) :] + data
            if MAGIC in seen:  # a forced command started the server instead
                return None
        started = time.perf_counter()
        got = len(seen.split(_READY_MARK, 1)[1])
        if send:
            block = bytes(1 << 20)
            left = send
            while left > 0:
                proc.stdin.write(block[: min(left, len(block))])
                left -= len(block)
            proc.stdin.close()
            proc.stdout.read()
        else:
            while got < receive:
                data = proc.stdout.read1(1 << 20)  # type: ignore[attr-defined]
                if not data:
                    return None
                got += len(data)
        elapsed = time.perf_counter() - started
        proc.wait(timeout=layer.timeout)
        return elapsed
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_throughput(layer: Any, size: int, report: Report) -> None:
    ready = "printf 'FLECHE-DOCTOR-READY\\n'"
    up = _stream(layer, f"{ready} && cat > /dev/null", size, 0)
    down = _stream(layer, f"{ready} && head -c {size} /dev/zero", 0, size)
    for check, seconds in (("upload", up), ("download", down)):
        if seconds is None:
            report.add("skip", check, "not measured: this key runs a forced command, or the stream broke")
        else:
            rate = size / max(seconds, 1e-9)
            report.add("ok", check, f"{human_bytes(rate)}/s ({human_bytes(size)} in {seconds:.2f} s)")


def _doctor_layer(layer: Any, args: argparse.Namespace, report: Report) -> None:
    probe = _probe(layer, report)
    if probe is None and report.results and report.results[-1]["status"] == "fail":
        return
    info = _connect(layer, report)
    _check_package(layer, probe, info, report)
    _check_config(probe, info, report)
    if info is None:
        return
    _check_server(layer, info, report)
    _check_latency(layer, report)
    if args.bytes > 0:
        _check_throughput(layer, args.bytes, report)


def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    """Check every ssh layer of a cache (or a host); exit 1 if a check fails."""
    from ..remote.client import SshCache

    report = Report(out, quiet=args.json)
    opened = open_cache(args.target, args, any_host=True)
    try:
        layers = layers_of(opened.cache)
        remote = [(i, layer) for i, layer in enumerate(layers) if isinstance(layer, SshCache)]
        if not remote:
            if not args.json:
                out.write(f"doctor {opened.label}\n")
            report.add("ok", "local", f"{opened.label} has no ssh layer; nothing to reach over ssh")
        for depth, layer in remote:
            if not args.json:
                where = f" layer {depth}" if len(layers) > 1 else ""
                out.write(f"doctor {opened.label}{where}: {layer.host}\n")
            layer.progress = False
            _doctor_layer(layer, args, report)
    finally:
        opened.close()
    if args.json:
        json.dump({"target": opened.label, "failed": report.failed, "checks": report.results}, out, indent=1)
        out.write("\n")
    else:
        warned = sum(r["status"] == "warn" for r in report.results)
        out.write(f"{report.failed} failed, {warned} warning(s), {len(report.results)} checks\n")
    return 1 if report.failed else 0


def register(sub: Any) -> None:
    """Add ``info`` and ``doctor`` to the command line."""
    target_help = "a cache name, NAME:LAYER, or a host (user@host) for an ad-hoc ssh cache"
    p = sub.add_parser(
        "info", help="what a cache is; for ssh, what its server reports", description=cmd_info.__doc__
    )
    p.add_argument("target", metavar="HOST|CACHE", help=target_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_cache_options(p)
    p.set_defaults(run=cmd_info)

    p = sub.add_parser(
        "doctor",
        help="check a remote set-up (ssh, python, package, fleche.toml, server, latency, throughput)",
        description=(
            "Check each ssh layer: ssh login, the remote Python and package (or bootstrap), which "
            "fleche.toml the server finds, the cache type, read-only status, login noise, round-trip "
            "latency and throughput each way. Prints a fix for each failure; exits 1 if any check fails."
        ),
    )
    p.add_argument("target", metavar="HOST|CACHE", help=target_help)
    p.add_argument(
        "--bytes",
        type=int,
        default=THROUGHPUT_BYTES,
        metavar="N",
        help="bytes to move each way for the throughput check (0: skip it)",
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    add_cache_options(p)
    p.set_defaults(run=cmd_doctor)
