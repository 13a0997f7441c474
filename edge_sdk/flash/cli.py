"""`edge-sdk flash | rollback | unflash`: the command lines behind `make flash`, `make rollback`
and `make unflash`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .flow import DEFAULT_ROOT, FlashError, FlashOptions, flash, rollback, unflash
from .target import Target, TargetError


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="local", metavar="[USER@]HOST[:PORT]",
                   help="the device, over SSH with key authentication (default: local, this machine)")
    p.add_argument("--identity", help="SSH private key (default: ssh's own)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT", help="extra `ssh -o` option (repeatable)")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"install folder on the device (default {DEFAULT_ROOT})")
    p.add_argument("--device-id", default="jetson", help="the daemon's device id (first flash only; default jetson)")
    p.add_argument("--port", type=int, default=1883, help="the device's local broker port (default 1883)")
    p.add_argument("--health-timeout", type=float, default=120.0, help="seconds the new release has to answer")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_flash_commands(sub) -> None:
    p = sub.add_parser("flash", help="install the SDK, a model and the daemon on a device (make flash)",
                       description="Preflight the device, send the code, the engine package and wheels (only what "
                                   "changed), compile the CPU kernels there, verify the package's hashes, "
                                   "build TensorRT engines where a GPU answers, configure mosquitto and the service, "
                                   "switch the release and check that the daemon answers; otherwise roll back to the "
                                   "previous release.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", type=Path, help="engine package directory to install")
    src.add_argument("--checkpoint", type=Path, help="checkpoint to build (INT4) for the device's profile, then install")
    p.add_argument("--profile", help="device profile (default: the one the device reports)")
    _add_target(p)
    p.set_defaults(func=run_flash)
    p = sub.add_parser("rollback", help="go back to the previous release on a device (make rollback)")
    _add_target(p)
    p.set_defaults(func=run_rollback)
    p = sub.add_parser("unflash", help="remove the service, its configuration and every release from a device")
    _add_target(p)
    p.set_defaults(func=run_unflash)


def _options(args, package: Path | None = None) -> FlashOptions:
    target = Target.parse(args.target, identity=args.identity, ssh_options=tuple(args.ssh_option))
    return FlashOptions(target=target, package=package or Path("."), profile=getattr(args, "profile", None),
                        root=args.root, device_id=args.device_id, port=args.port, health_timeout=args.health_timeout)


def _package_for(args) -> Path:
    if args.package is not None:
        return args.package
    from ..build import build
    from ..quant import QuantRecipe
    from .preflight import detect_profile

    target = Target.parse(args.target, identity=args.identity, ssh_options=tuple(args.ssh_option))
    profile = args.profile or detect_profile(target.step("facts", args.root))
    if profile is None:
        raise FlashError(f"{target.name} does not say which Jetson it is: pass --profile")
    return build(args.checkpoint, QuantRecipe(method="int4"), device=profile, progress=not args.quiet)


def _fail(args, exc: Exception) -> int:
    print(f"edge-sdk {args.command}: {exc}", file=sys.stderr)
    return 1


def run_flash(args) -> int:
    try:
        report = flash(_options(args, _package_for(args)), progress=not args.quiet)
    except (FlashError, TargetError) as exc:
        return _fail(args, exc)
    print(report.summary())
    return 0


def run_rollback(args) -> int:
    try:
        print(f"now serving release {rollback(_options(args))}")
    except (FlashError, TargetError) as exc:
        return _fail(args, exc)
    return 0


def run_unflash(args) -> int:
    try:
        unflash(_options(args))
    except (FlashError, TargetError) as exc:
        return _fail(args, exc)
    print(f"removed edge_sdk from {args.target}")
    return 0
