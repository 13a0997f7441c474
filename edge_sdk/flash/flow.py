"""`make flash`, `make rollback`, `make unflash`: the workstation (or the device itself) drives the
device through device.sh, one named stage at a time.

Layout on the device (ROOT, default /opt/edge-sdk):
    packages/<key>/        an engine package, verified against its hashes once, then only read
                           (and given its TensorRT engines by `edge-sdk compile` on the device)
    venvs/<key>/           a Python environment per dependency set, from wheels sent along
    releases/<id>/         src/ (the code, with the CPU kernels compiled into it there),
                           package -> ../../packages/<key>, venv -> ../../venvs/<key>,
                           edge-sdk.service (the rendered unit)
    current, previous      symlinks to releases: switching is one rename
    log/releases.log       one JSON line per flash, rollback and failure
A release id hashes the code, the package's manifest and the dependency set: nothing changed,
same id, nothing sent, nothing rebuilt, nothing restarted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..package import load_manifest
from .preflight import run_preflight
from .target import Target, TargetError

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
CODE_PATHS = ("edge_sdk", "devices", "pyproject.toml", "README.md")
DEFAULT_ROOT = "/opt/edge-sdk"
WHEEL_CACHE = Path.home() / ".cache" / "edge-sdk" / "wheels"


class FlashError(RuntimeError):
    """A flash that stopped; the message says at which stage and why (rolled back if it got that far)."""


@dataclass
class FlashOptions:
    target: Target
    package: Path
    profile: str | None = None
    root: str = DEFAULT_ROOT
    device_id: str = "jetson"
    port: int = 1883
    health_timeout: float = 120.0
    wheelhouse: Path | None = None  # default: pip download into WHEEL_CACHE


@dataclass
class FlashReport:
    release: str
    changed: bool
    files_sent: int = 0
    bytes_sent: int = 0
    venv: str = ""
    kernel: str = ""
    engines: str = ""
    preflight: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "installed and started" if self.changed else "already current: nothing restarted"
        return (f"release {self.release} {what}; sent {self.files_sent} files ({self.bytes_sent / 1e6:.1f} MB), "
                f"venv {self.venv}, kernel {self.kernel}, engines {self.engines}")


def code_files() -> list[str]:
    """The files a release carries (tracked files under CODE_PATHS), relative to the project."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *CODE_PATHS], cwd=PROJECT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [str(p.relative_to(PROJECT)) for c in CODE_PATHS for p in sorted((PROJECT / c).rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts] + [c for c in CODE_PATHS if (PROJECT / c).is_file()]
    return sorted(f for f in set(out) if (PROJECT / f).is_file())


def requirements() -> list[str]:
    """The runtime dependencies (pyproject's [project].dependencies): what the device's venv holds."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def venv_key(facts: dict[str, str]) -> str:
    return _digest(*requirements(), facts.get("arch", ""), facts.get("python", ""))


def package_key(package: Path) -> str:
    """The package as built here: its manifest (every file's sha256 and the model's facts). The
    device's copy may gain TensorRT engines and a manifest that lists them; its key stays."""
    return _digest((package / "manifest.json").read_bytes())


def release_id(files: list[str], pkg_key: str, env_key: str, opts: FlashOptions) -> str:
    parts = [f"{f}:{hashlib.sha256((PROJECT / f).read_bytes()).hexdigest()}" for f in files]
    return _digest(*parts, pkg_key, env_key, opts.device_id, str(opts.port))


def wheelhouse(facts: dict[str, str], key: str, cache: Path | None) -> Path:
    """Wheels of the runtime dependencies for the device's CPU and Python, downloaded once (the
    device may have no network). pycuda is fetched as source, for the device to build against its
    own CUDA, when the device has nvcc and TensorRT."""
    out = (cache or WHEEL_CACHE) / key
    if (out / ".complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(out), "-r", str(out / "requirements.txt")]
    local_py = "%d.%d" % sys.version_info[:2]
    if facts.get("arch") != platform.machine() or facts.get("python") != local_py:
        cmd += ["--only-binary=:all:", "--python-version", facts.get("python", local_py),
                "--platform", f"manylinux2014_{facts.get('arch')}", "--platform", f"manylinux_2_28_{facts.get('arch')}"]
    subprocess.run(cmd, check=True)
    if facts.get("nvcc") == "yes" and facts.get("tensorrt"):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(out), "pycuda"], check=False)
    (out / ".complete").touch()
    return out


def render_unit(root: str) -> str:
    """devices/systemd/edge-sdk.service with this release's paths."""
    unit = (PROJECT / "devices" / "systemd" / "edge-sdk.service").read_text()
    return (unit.replace("/opt/edge-sdk/.venv/bin/edge-sdk", f"{root}/current/venv/bin/python -m edge_sdk.cli")
                .replace("/opt/edge-sdk/engines/current", f"{root}/current/package")
                .replace("file:///opt/edge-sdk/edge_sdk/", f"file://{root}/current/src/edge_sdk/"))


def _log_line(target: Target, root: str, **event) -> None:
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}
    try:
        target.step("log", root, json.dumps(event, sort_keys=True))
    except TargetError as exc:
        log.warning("could not write the release log: %s", exc)


def flash(opts: FlashOptions, progress: bool = True) -> FlashReport:
    """Preflight, send, install, switch, restart, health-check; roll back on a failed check.
    A device-side failure before the switch leaves the running release as it was."""
    stages = tqdm(total=10, desc="flash", unit="stage", disable=not progress, leave=False)
    at = ["preflight"]
    try:
        return _flash(opts, stages, at)
    except TargetError as exc:
        raise FlashError(f"flash stopped at {at[0]}: {exc}") from None
    finally:
        stages.close()


def _flash(opts: FlashOptions, stages, at: list[str]) -> FlashReport:
    t, root = opts.target, opts.root

    def stage(name: str) -> None:
        at[0] = name
        stages.set_description(f"flash: {name}")
        stages.update(1)
        log.info("flash %s: %s", t.name, name)

    stage("preflight")
    facts = t.step("facts", root)
    t.sudo = facts.get("uid") != "0"
    manifest = load_manifest(opts.package, verify=True)
    package_bytes = sum(p.stat().st_size for p in opts.package.rglob("*") if p.is_file())
    pf = run_preflight(facts, manifest, package_bytes, opts.profile)
    for line in pf.notes:
        log.info("preflight: %s", line)
    if not pf.ok:
        raise FlashError("preflight failed, nothing was changed on " + t.name + ":\n  " + "\n  ".join(pf.failures))

    files = code_files()
    env_key, pkg_key = venv_key(facts), package_key(opts.package)
    rid = release_id(files, pkg_key, env_key, opts)
    report = FlashReport(release=rid, changed=facts.get("current") != rid, preflight=pf.notes)

    stage("send")
    t.step("prepare", root, rid)
    rel = f"{root}/releases/{rid}"
    sent = [t.push(wheelhouse(facts, env_key, opts.wheelhouse), f"{root}/wheels/{env_key}"),
            t.push(PROJECT, f"{rel}/src", files_from=files, link_dest=f"{root}/current/src")]
    facts_pkg = t.step("package", root, pkg_key)
    if facts_pkg.get("package") != "complete":
        sent.append(t.push(opts.package, f"{root}/packages/{pkg_key}"))
    report.files_sent = sum(s.files for s in sent)
    report.bytes_sent = sum(s.bytes for s in sent)

    stage("venv")
    report.venv = t.step("venv", root, rid, env_key)["venv"]
    stage("kernel")
    report.kernel = t.step("kernel", root, rid).get("kernel", "")
    stage("verify package")
    t.step("verify", root, rid, pkg_key)
    stage("engines")
    report.engines = t.step("engines", root, rid).get("engines", "")
    stage("configure")
    _write_unit(t, rel, render_unit(root))
    t.step("configure", root, rid, opts.device_id, str(opts.port))
    if not report.changed:
        stage("health")
        why = _health(t, opts)
        if why:  # the right release, not running (a reboot without systemd, a crash): start it again
            log.warning("release %s is current but does not answer (%s); restarting it", rid, why)
            t.step("restart", root)
            why = _health(t, opts)
        if why:
            raise FlashError(f"release {rid} is current but does not answer, even after a restart: {why}")
        _log_line(t, root, event="flash", release=rid, changed=False, files_sent=report.files_sent)
        return report
    stage("switch")
    switched = t.step("switch", root, rid)
    stage("restart")
    t.step("restart", root)
    stage("health")
    why = _health(t, opts)
    if why is None:
        _log_line(t, root, event="flash", release=rid, changed=True, files_sent=report.files_sent,
                  bytes_sent=report.bytes_sent, venv=report.venv, kernel=report.kernel, engines=report.engines)
        return report
    previous = switched.get("previous", "none")
    _log_line(t, root, event="failed", release=rid, why=why, rolled_back_to=previous)
    if previous == "none":
        raise FlashError(f"release {rid} did not pass the health check ({why}); no previous release to go back to")
    t.step("rollback", root)
    t.step("restart", root)
    again = _health(t, opts)
    raise FlashError(f"release {rid} did not pass the health check ({why}); rolled back to {previous}"
                     + (" which serves again" if again is None else f", which does not answer either ({again})"))


def _write_unit(t: Target, rel: str, unit: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "edge-sdk.service").write_text(unit)
        t.push(Path(tmp), rel, delete=False)


def _health(t: Target, opts: FlashOptions) -> str | None:
    try:
        t.step("health", opts.root, opts.device_id, str(opts.port), str(opts.health_timeout),
               timeout=opts.health_timeout + 60)
        return None
    except TargetError as exc:
        return str(exc).split(": ", 2)[-1]


def rollback(opts: FlashOptions) -> str:
    """Back to the previous release, restarted and health-checked; returns its id."""
    t, root = opts.target, opts.root
    t.sudo = t.step("facts", root).get("uid") != "0"
    back = t.step("rollback", root)["current"]
    t.step("restart", root)
    why = _health(t, opts)
    _log_line(t, root, event="rollback", release=back, healthy=why is None)
    if why:
        raise FlashError(f"rolled back to {back}, but it does not answer: {why}")
    return back


def unflash(opts: FlashOptions) -> None:
    """Stop and remove the service, its configuration, credentials and every release."""
    t = opts.target
    t.sudo = t.step("facts", opts.root).get("uid") != "0"
    t.step("unflash", opts.root)
