"""Command-line glue for ``edge-sdk serve`` and ``edge-sdk schema`` (edge_sdk/cli.py wires these
in; ``python -m edge_sdk.serve`` runs them standalone).

Every ServeSettings field is a flag: ``--host``, ``--port``, ``--device-id``, ``--queue-length``...
Precedence: flags > ``EDGE_SDK_*`` environment > ``--config FILE`` (TOML/JSON) > defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any

from edge_sdk.serve.config import ServeSettings

log = logging.getLogger("edge_sdk.serve")


def _flag_type(annotation) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if base in (int, float):
        return base
    return str


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per ServeSettings field (bools get ``--x/--no-x``)."""
    g = parser.add_argument_group("daemon settings (also EDGE_SDK_<NAME> env vars or --config keys)")
    for name, f in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = f.description or ""
        if f.annotation is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            g.add_argument(flag, dest=name, type=_flag_type(f.annotation), default=None, help=help_)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", nargs="+", metavar="[NAME=]PACKAGE",
                        help="engine package directories (edge_sdk.load); several serve side by side, e.g. a "
                             "Ministral 3 package for text and images and a Voxtral package for speech. The first "
                             "is the default; a request names one (NAME, default: the manifest's model name) or "
                             "goes to the first that takes its media")
    parser.add_argument("--config", dest="config_file", default=None, help="TOML or JSON settings file")
    add_settings_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    overrides = {k: getattr(args, k, None) for k in ServeSettings.model_fields}
    return ServeSettings.load(getattr(args, "config_file", None), **overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def load_engine(engine: str | Path, **options: Any) -> Any:
    """``edge_sdk.load(engine, **options)`` for an engine package directory; ``module:factory``
    (not an existing path) imports ``module`` and calls ``factory()`` instead (tests, demos, custom
    models)."""
    import edge_sdk

    spec = str(engine)
    if ":" in spec and not Path(spec).exists():
        import importlib

        mod, _, attr = spec.partition(":")
        return getattr(importlib.import_module(mod), attr)()

    load = getattr(edge_sdk, "load", None)
    if load is None:
        from edge_sdk.runtime import load  # type: ignore[attr-defined,no-redef]
    return load(engine, **options)


def load_engines(specs: list[str], **options: Any) -> list[tuple[str | None, Any]]:
    """``[NAME=]PACKAGE`` specs -> (name, model) pairs, each loaded with ``options``
    (``edge_sdk.load``'s), after checking that the packages fit in memory together (raises
    ValueError, one line, before anything is loaded)."""
    from edge_sdk.serve.models import check_memory, parse_packages

    pairs = parse_packages(specs)
    packages = [path for _, path in pairs if Path(path).is_dir()]
    if packages:
        check_memory(packages)
    out = []
    for name, path in pairs:
        log.info("loading engine package %s%s", path, f" as {name}" if name else "")
        out.append((name, load_engine(path, **options)))
    return out


def serve(engine: Any, settings: ServeSettings | None = None, *, config_file: str | Path | None = None,
          **overrides: Any) -> int:
    """Load ``engine`` (a package path, a list of ``[NAME=]PACKAGE`` specs, or already loaded
    models as ``Daemon`` takes them) once and serve until SIGTERM/SIGINT. Returns the exit code."""
    from edge_sdk.serve.daemon import Daemon

    settings = settings or ServeSettings.load(config_file, **overrides)
    _setup_logging(settings.log_level)
    if isinstance(engine, (str, Path)):
        engine = [str(engine)]
    if isinstance(engine, list) and all(isinstance(e, str) for e in engine):
        try:
            engine = load_engines(engine, kv_cache=settings.kv_cache)
        except ValueError as e:
            print(f"edge-sdk serve: {e}", file=sys.stderr)
            return 2
    return 0 if Daemon(engine, settings).serve_forever() else 1


def run_serve(args: argparse.Namespace) -> int:
    """For edge_sdk/cli.py: ``edge-sdk serve`` after ``add_serve_arguments``."""
    try:
        settings = settings_from_args(args)
    except Exception as e:  # pydantic ValidationError, bad file
        print(f"edge-sdk serve: bad settings: {e}", file=sys.stderr)
        return 2
    return serve(args.engine, settings)


def add_schema_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="write <name>.schema.json files into this directory")
    parser.add_argument("--name", default=None, help="print only this schema (e.g. chat_request)")


def run_schema(args: argparse.Namespace) -> int:
    """``edge-sdk schema``: print (or write) the JSON Schemas of every payload."""
    from edge_sdk.protocol.json_schema import json_schemas, write_schemas

    if args.out:
        for p in write_schemas(args.out):
            print(p)
        return 0
    schemas = json_schemas()
    if args.name:
        if args.name not in schemas:
            print(f"unknown schema {args.name!r}; one of {sorted(schemas)}", file=sys.stderr)
            return 2
        schemas = schemas[args.name]
    print(json.dumps(schemas, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_sdk.serve")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_serve_arguments(sub.add_parser("serve", help="run the MQTT daemon"))
    add_schema_arguments(sub.add_parser("schema", help="print the payload JSON Schemas"))
    args = p.parse_args(argv)
    return run_serve(args) if args.cmd == "serve" else run_schema(args)
