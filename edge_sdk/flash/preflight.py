"""Preflight: everything a flash needs from the device, checked before anything is changed.

The facts come from `device.sh facts` (one `key=value` per line). Each failed check is one line
saying what was found and what is needed; a flash with any stops there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..devices import DeviceProfile, kv_cache_bytes, list_profiles, load_profile

#: L4T major release -> JetPack major (the release line of /etc/nv_tegra_release).
L4T_TO_JETPACK = {35: 5, 36: 6, 38: 7}
#: Words of the device-tree model -> device profile.
MODEL_PROFILES = (("orin nano", "orin-nano-8gb"), ("orin nx", "orin-nx-16gb"), ("agx orin", "agx-orin-64gb"),
                  ("thor", "agx-thor"))
SOFTWARE_BYTES = 1_500_000_000  # the release's venv and wheels
MIN_PYTHON = (3, 10)


@dataclass
class Preflight:
    profile: DeviceProfile
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def l4t_release(facts: dict[str, str]) -> tuple[int, str] | None:
    """(major, revision) from '# R36 (release), REVISION: 4.3, ...'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", facts.get("l4t_release", ""))
    return (int(m.group(1)), m.group(2)) if m else None


def detect_profile(facts: dict[str, str]) -> str | None:
    model = facts.get("model", "").lower()
    return next((name for words, name in MODEL_PROFILES if words in model and name in list_profiles()), None)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def run_preflight(facts: dict[str, str], manifest, package_bytes: int, profile_name: str | None = None) -> Preflight:
    """Check ``facts`` against the package (its manifest and size) and the device profile
    (``profile_name``, else the one the device reports, else the package's)."""
    name = profile_name or detect_profile(facts) or manifest.device
    profile = load_profile(name)
    pf = Preflight(profile)
    fail, note = pf.failures.append, pf.notes.append
    if manifest.device != profile.name:
        fail(f"package was built for {manifest.device} but the device is {profile.name}: rebuild it with "
             f"--device {profile.name}")
    if profile.backend == "tensorrt":
        release = l4t_release(facts)
        want = _version(profile.jetpack or "")[:1]
        if release is None:
            fail("no L4T release (/etc/nv_tegra_release): not a Jetson with JetPack, or an image without it")
        elif want and L4T_TO_JETPACK.get(release[0]) != want[0]:
            fail(f"L4T R{release[0]}.{release[1]} is JetPack {L4T_TO_JETPACK.get(release[0], '?')}, "
                 f"but {profile.name} needs JetPack {profile.jetpack}")
        else:
            note(f"L4T R{release[0]}.{release[1]} (JetPack {L4T_TO_JETPACK[release[0]]}), "
                 f"nvidia-l4t-core {facts.get('l4t_core') or 'not listed'}")
        trt = facts.get("tensorrt", "")
        if not trt:
            fail(f"TensorRT not found (dpkg tensorrt, NvInferVersion.h): {profile.name} needs {profile.tensorrt_version}+")
        elif _version(trt) < _version(profile.tensorrt_version or "0"):
            fail(f"TensorRT {trt} is older than the {profile.tensorrt_version} {profile.name} needs")
        else:
            note(f"TensorRT {trt}, CUDA {facts.get('cuda') or 'unknown'}")
        mode = facts.get("power_mode", "")
        note(f"power mode {mode or 'unknown (nvpmodel -q)'}"
             + ("" if "MAXN" in mode.upper() else ": decode speed follows memory clocks; MAXN gives the figures "
                                                  "the profile states"))
    py = _version(facts.get("python", ""))
    if py < MIN_PYTHON:
        fail(f"python3 {facts.get('python') or 'missing'}: needs {'.'.join(map(str, MIN_PYTHON))}+")
    if facts.get("python_venv") == "no":
        fail("python3 cannot make virtual environments (no ensurepip): apt install python3-venv")
    if facts.get("rsync") == "no":
        fail("rsync is not installed on the device: apt install rsync")
    if facts.get("sudo") == "no":
        fail("the login is not root and `sudo -n` asks for a password: allow it passwordless sudo, or log in as root")
    if facts.get("mosquitto") == "missing":
        fail("mosquitto is neither installed nor installable (apt-cache policy mosquitto): add it to the image")
    disk = int(facts.get("disk_free_bytes") or 0)
    need = package_bytes + SOFTWARE_BYTES
    if disk < need:
        fail(f"{disk / 1e9:.1f} GB free where the release goes, needs {need / 1e9:.1f} GB "
             f"(package {package_bytes / 1e9:.1f} GB + software)")
    mem = int(facts.get("mem_total_kb") or 0) * 1024
    text = manifest.model.text
    kv = kv_cache_bytes(text, manifest.context_length, profile.compute_bytes)
    usable = mem * profile.usable_memory_fraction
    if package_bytes + kv > usable:
        fail(f"model needs ~{(package_bytes + kv) / 1e9:.1f} GB (weights {package_bytes / 1e9:.1f} + KV cache "
             f"{kv / 1e9:.1f} for {manifest.context_length} tokens) but {profile.name} may use "
             f"{usable / 1e9:.1f} GB of its {mem / 1e9:.1f} GB")
    return pf
