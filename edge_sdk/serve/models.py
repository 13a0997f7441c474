"""The models one daemon serves, and which of them a request goes to.

A robot may run a Ministral 3 package for text and images beside a Voxtral package for speech:
``edge-sdk serve PKG [NAME=PKG ...]``. The first model is the default. A request names a model
(``model``), or is routed by what it holds: to the first model that takes all of its
modalities (text only: the first model). All models share the one worker and queue, because
they share the one accelerator. Before any is loaded, their memory together is checked against
the device (``check_memory``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edge_sdk.protocol.models import MODEL_NAME_PATTERN
from edge_sdk.serve.transport import Refusal

log = logging.getLogger("edge_sdk.serve")

_NAME_RE = re.compile(MODEL_NAME_PATTERN)


def model_info(model: Any) -> dict:
    """name / context_length / modalities from ``model.capabilities()`` where it exists."""
    caps = getattr(model, "capabilities", None)
    info: dict = {}
    try:
        info = dict(caps() if callable(caps) else (caps or {}))
    except Exception:  # a broken capabilities() must not stop the daemon
        log.exception("model.capabilities() failed")
    name = info.get("model") or info.get("name") or getattr(model, "name", None) or type(model).__name__
    mods = info.get("modalities") or ["text"]
    return {"name": str(name), "context_length": info.get("context_length"), "modalities": list(mods)}


def model_name(text: str) -> str:
    """``text`` made a legal model name (letters, digits, '.', '_', '-'; 64 at most)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name or "model"


@dataclass(frozen=True)
class Served:
    name: str
    model: Any
    info: dict  # name, context_length, modalities (as capabilities.models[] says)


class ModelSet:
    """``ModelSet(model)``, ``ModelSet({"vision": m1, "speech": m2})`` or ``ModelSet([(None, m1),
    ("speech", m2)])`` (None: the name its manifest gives). The first is the default."""

    def __init__(self, models: Any):
        items = (list(models.items()) if isinstance(models, dict) else list(models) if isinstance(models, list)
                 else [(None, models)])
        if not items:
            raise ValueError("a daemon serves at least one model")
        self.served: list[Served] = []
        for name, model in items:
            info = model_info(model)
            name = model_name(name or info["name"])
            if not _NAME_RE.match(name) or any(s.name == name for s in self.served):
                raise ValueError(f"model name {name!r} is used twice or not of [A-Za-z0-9._-]: name them NAME=PACKAGE")
            self.served.append(Served(name, model, {**info, "name": name}))

    @property
    def default(self) -> Served:
        return self.served[0]

    @property
    def modalities(self) -> list[str]:
        return sorted({m for s in self.served for m in s.info["modalities"]})

    def __len__(self) -> int:
        return len(self.served)

    def infos(self) -> list[dict]:
        return [s.info for s in self.served]

    def get(self, name: str | None) -> Any:
        """The model of a routed job (None: the default)."""
        return self._by_name(name).model if name else self.default.model

    def route(self, name: str | None, needs: Iterable[str], what: str) -> str:
        """The name of the model a request for ``needs`` (modalities) goes to; ``what`` names the
        media in the refusal. Refusal ``invalid_request`` (no such model) or ``unsupported_media``."""
        needs = set(needs)
        if name is not None:
            served = self._by_name(name)
            if not needs <= set(served.info["modalities"]):
                raise Refusal("unsupported_media", f"model {served.name} takes no {what} "
                                                   f"(modalities: {served.info['modalities']})")
            return served.name
        for served in self.served:
            if needs <= set(served.info["modalities"]):
                return served.name
        if len(self.served) == 1:
            s = self.default
            raise Refusal("unsupported_media", f"model {s.name} takes no {what} (modalities: {s.info['modalities']})")
        listing = "; ".join(f"{s.name}: {', '.join(s.info['modalities'])}" for s in self.served)
        raise Refusal("unsupported_media", f"no model on this device takes {what} ({listing})")

    def _by_name(self, name: str) -> Served:
        for served in self.served:
            if served.name == name:
                return served
        raise Refusal("invalid_request", f"no model {name!r} on this device (models: "
                                         f"{', '.join(s.name for s in self.served)})")


def parse_packages(specs: Iterable[str]) -> list[tuple[str | None, str]]:
    """``["pkgA", "speech=pkgB"]`` -> ``[(None, "pkgA"), ("speech", "pkgB")]`` (None: the manifest names it)."""
    out: list[tuple[str | None, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        out.append((name, path) if sep and _NAME_RE.match(name) and not Path(spec).exists() else (None, spec))
    return out


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux; on a Jetson the GPU shares it), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(packages: Iterable[str | Path], available: int | None = None) -> int:
    """Refuse (ValueError, one line) packages whose weights + KV caches together exceed their device
    profile's usable memory or what this host has free; returns the bytes they need."""
    from edge_sdk.devices import GB, estimate_memory, load_profile
    from edge_sdk.package import load_manifest

    needs, usable = [], []
    for path in packages:
        m = load_manifest(Path(path), verify=False)
        profile = load_profile(m.device)
        est = estimate_memory(profile, m.quant.get("method", "none"), m.model, m.context_length,
                              int4_block_size=m.quant.get("block_size") or 128)
        needs.append((Path(path).name, est.total_bytes))
        usable.append((f"the {profile.name} profile allows", est.usable_bytes))
    total = sum(n for _, n in needs)
    available = mem_available_bytes() if available is None else available
    if available is not None:
        usable.append(("this host has free", available))
    limit_what, limit = min(usable, key=lambda u: u[1])
    if len(needs) > 1:
        log.info("the %d packages need ~%.2f GB together (%s)", len(needs), total / GB,
                 ", ".join(f"{n} {b / GB:.2f} GB" for n, b in needs))
    if total > limit:
        parts = ", ".join(f"{n} {b / GB:.2f} GB" for n, b in needs)
        raise ValueError(f"the packages need ~{total / GB:.2f} GB of weights and KV cache ({parts}) but {limit_what} "
                         f"{limit / GB:.2f} GB")
    return total
