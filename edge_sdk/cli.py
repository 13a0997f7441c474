"""`edge-sdk`: build engine packages, generate from them, verify them, serve them over MQTT.

Every subcommand explains itself with `--help`. Errors the user can fix (a bad checkpoint, a
tampered package, a profile that cannot run the request) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_sdk.runtime.types import KV_CACHE_DTYPES

EPILOG = """examples:
  edge-sdk build ./Ministral-3-3B-Instruct-2512 --quant int4 --device orin-nano-8gb
  edge-sdk generate engines/my-model --prompt "Where is the charging dock?" --max-tokens 64
  edge-sdk verify engines/my-model [--run]
  edge-sdk transcribe engines/voxtral-int4-cpu command.wav --language en
  edge-sdk serve engines/my-model --host localhost --port 1883 --device-id robot-1
  edge-sdk bench engines/my-model [--mqtt | --vision]
  edge-sdk devices
  edge-sdk flash --package engines/my-model --target nvidia@jetson.local
"""


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_backend(p: argparse.ArgumentParser, default_accuracy: int = 4, default_kv: str = "float16") -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto: TensorRT when a GPU and engines are present, else ONNX Runtime")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    p.add_argument("--accuracy-level", type=int, default=default_accuracy, choices=[0, 1, 2, 3, 4],
                   help=f"ONNX Runtime INT4 kernel: 4 = int8 activations (fast), 0 = exact float "
                        f"(default {default_accuracy})")
    p.add_argument("--kv-cache", default=default_kv, choices=KV_CACHE_DTYPES,
                   help="ONNX Runtime: what the KV cache holds; float16 halves what a long-context step reads, "
                        "int8 (a scale per row) halves it again, float32 keeps the graph's exact arithmetic "
                        f"(default {default_kv})")


def _backend_options(args) -> dict:
    if args.backend == "tensorrt":
        return {}
    return {"threads": args.threads, "accuracy_level": args.accuracy_level, "kv_cache": args.kv_cache}


def cmd_build(args) -> int:
    from .build import build
    from .quant import QuantRecipe

    recipe = QuantRecipe(method=args.quant, block_size=args.block_size, awq=not args.no_awq, head=args.head,
                         calibration_file=args.calib, fp8_granularity=args.fp8_granularity)
    out = build(args.checkpoint, recipe, device=args.device, out=args.output, tokenizer=args.tokenizer,
                context_length=args.context, progress=not args.quiet, plugins=not args.no_plugins)
    print(out)
    return 0


def _prompt(args):
    if args.prompt_ids:
        return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    if args.messages:
        try:
            return json.loads(Path(args.messages).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{args.messages}: cannot read chat messages ({exc})") from None
    if args.image or args.audio:
        parts = [{"type": "image", "image": str(img)} for img in args.image or []]
        parts += [{"type": "audio", "audio": str(clip)} for clip in args.audio or []]
        default = "Describe the image." if args.image else "What is said?"
        return [{"role": "user", "content": parts + [{"type": "text", "text": args.prompt or default}]}]
    return args.prompt


def cmd_generate(args) -> int:
    from .runtime.model import load

    model = load(args.engine, backend=args.backend, **_backend_options(args))
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop)
    stream = model.stream(_prompt(args), **kwargs)
    for delta in stream:
        if not args.json:
            print(delta.text, end="", flush=True)
    result = stream.result
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "time_to_first_token_s": result.time_to_first_token_s,
                          "tokens_per_second": result.tokens_per_second}))
    else:
        print()
        logging.getLogger("edge_sdk").info("%s: %d prompt + %d generated tokens, first token %.3f s, %.1f tok/s",
                                           result.finish_reason, result.prompt_tokens, result.completion_tokens,
                                           result.time_to_first_token_s or 0.0, result.tokens_per_second)
    return 0


def cmd_transcribe(args) -> int:
    from .runtime.model import load

    model = load(args.engine, backend=args.backend, **_backend_options(args))
    result = model.transcribe(args.audio, language=args.language, max_tokens=args.max_tokens)
    print(json.dumps({"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason})
          if args.json else result.text)
    return 0


def cmd_verify(args) -> int:
    from .package import verify_package

    files = verify_package(args.engine)
    print(f"{args.engine}: OK ({len(files)} files match their sha256)")
    if not args.run:
        return 0
    from .golden import check_golden
    from .runtime.model import load

    model = load(args.engine, backend=args.backend, verify=False, **_backend_options(args))
    golden = model.manifest.extra.get("golden")
    if golden is None:
        raise ValueError(f"{args.engine}: the manifest has no golden outputs (built by an older edge_sdk); rebuild it")
    report = check_golden(model.backend, golden)
    print(f"{args.engine} on {model.backend.name}: {report.summary()}")
    return 0 if report.ok else 1


def cmd_compile(args) -> int:
    from .compile import compile_package

    engines = compile_package(args.engine, args.device, strict=True, max_prefill=args.max_prefill)
    print(f"{args.engine}: compiled {', '.join(sorted(engines))}")
    return 0


def cmd_bench(args) -> int:
    """Decode speed vs the bandwidth roofline; with --mqtt, the broker's overhead; with --vision, images."""
    if args.mqtt:
        from .runtime.model import load
        from .bench_mqtt import bench_mqtt, bench_round_trip, format_bench, format_round_trip

        model = load(args.engine, backend=args.backend, **_backend_options(args))
        report = bench_mqtt(model, max_tokens=args.new_tokens, runs=args.runs, host=args.broker_host,
                            port=args.broker_port)
        text = format_bench(report)
        if args.broker_host is None:  # the broker-config comparison needs private brokers
            report["round_trip"] = bench_round_trip(model)
            text += "\n" + format_round_trip(report["round_trip"])
    elif args.vision:
        from .export.vision import bench_vision

        report = {"vision": bench_vision(Path(args.engine) / "vision.onnx", sizes=tuple(args.sizes),
                                         repeats=args.runs, threads=args.threads)}
        text = "\n".join(f"{r['size']:>4}px  {r['image_tokens']:>5} image tokens  preprocess {r['preprocess_ms']:7.1f} ms"
                         f"  encoder {r['encode_ms']:9.1f} ms" for r in report["vision"])
    else:
        from .bench import bench_package, format_report

        report = bench_package(Path(args.engine), backend=args.backend, threads=args.threads,
                               prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs)
        text = format_report(report)
    print(json.dumps(report, default=str) if args.json else text)
    return 0


def cmd_devices(args) -> int:
    from .devices import list_profiles, load_profile

    print(f"{'profile':16} {'backend':12} {'sm':>4} {'memory':>8} {'GB/s':>6}  precisions")
    for name in list_profiles():
        p = load_profile(name)
        print(f"{p.name:16} {p.backend:12} {p.sm or '-':>4} {p.memory_gb:>6.0f}GB {p.memory_bandwidth_gbs:>6.0f}  "
              f"{','.join(p.precisions)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .flash.cli import add_flash_commands
    from .serve.cli import add_schema_arguments, add_serve_arguments, run_schema, run_serve

    parser = argparse.ArgumentParser(prog="edge-sdk", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="checkpoint -> quantized ONNX (+ TensorRT) engine package",
                       description="Quantize a Hugging Face or Mistral-native Ministral 3 checkpoint, export "
                                   "ONNX graphs and (on a device with TensorRT) compile engines.")
    p.add_argument("checkpoint", help="checkpoint directory (config.json or params.json + safetensors)")
    p.add_argument("--quant", choices=["none", "int4", "fp8"], default="int4",
                   help="int4: weight-only block-wise with AWQ scaling; fp8: E4M3 weights and activations")
    p.add_argument("--device", default="cpu", help="device profile (see `edge-sdk devices`)")
    p.add_argument("-o", "--output", help="package directory (default engines/<name>-<quant>-<device>)")
    p.add_argument("--tokenizer", help="tekken.json (default: the one in the checkpoint directory)")
    p.add_argument("--calib", help="calibration text file (default: the one shipped with edge_sdk)")
    p.add_argument("--block-size", type=int, default=128, choices=[32, 64, 128], help="INT4 block size (default 128)")
    p.add_argument("--no-awq", action="store_true", help="plain round-to-nearest INT4, no activation-aware scaling")
    p.add_argument("--head", choices=["auto", "int4", "int8", "float"], default="auto",
                   help="LM head and token table with --quant int4 (auto: INT4 unless its top-1 agreement with the "
                        "float head on the calibration text is below 0.9, then INT8)")
    p.add_argument("--fp8-granularity", choices=["tensor", "channel"], default="tensor",
                   help="FP8 weight scales per tensor (default) or per output channel")
    p.add_argument("--context", type=int, help="context length (default: the device profile's)")
    p.add_argument("--no-plugins", action="store_true",
                   help="TensorRT profiles: ship only the standard graph, no INT4 GEMM / attention plugin graph")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="generate text from an engine package",
                       description="Generate from an engine package, streaming text to stdout.")
    p.add_argument("engine", help="engine package directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="user message (sent in the instruct chat format)")
    src.add_argument("--messages", help="JSON file with a list of chat messages")
    src.add_argument("--prompt-ids", help="comma-separated token ids, used as is (raw completion)")
    p.add_argument("--image", action="append", type=Path, help="image file for the prompt (repeatable)")
    p.add_argument("--audio", action="append", type=Path, help="audio file (WAV/FLAC/OGG) for the prompt (repeatable; "
                                                              "Voxtral packages)")
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and usage")
    _add_sampling(p)
    _add_backend(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("transcribe", help="speech to text with a Voxtral package",
                       description="Transcribe an audio file (WAV, FLAC, OGG; any rate, resampled to 16 kHz; "
                                   "longer than 30 s is cut into 30 s chunks).")
    p.add_argument("engine", help="engine package directory (built from a Voxtral checkpoint)")
    p.add_argument("audio", type=Path, help="audio file")
    p.add_argument("--language", help="ISO-639-1 code (e.g. en); default: let the model tell")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens of transcript (default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and tokens")
    _add_backend(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("verify", help="check an engine package's file hashes (and, with --run, its outputs)",
                       description="Check every file against the manifest's sha256. With --run, also replay the "
                                   "golden outputs recorded at build time on a backend and fail (exit 1) when "
                                   "the logits or greedy tokens diverge beyond the stated tolerance.")
    p.add_argument("engine", help="engine package directory")
    p.add_argument("--run", action="store_true", help="run the golden prompts and compare with the recorded outputs")
    _add_backend(p, default_accuracy=0, default_kv="float32")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compile", help="compile a package's ONNX graphs into TensorRT engines (on the device)",
                       description="Run on the Jetson: builds TensorRT plans for the package's graphs and "
                                   "records them in its manifest. Needs a GPU, TensorRT and pycuda.")
    p.add_argument("engine", help="engine package directory")
    p.add_argument("--device", help="device profile (default: the one the package was built for)")
    p.add_argument("--max-prefill", type=int, default=512, help="longest prompt chunk per TensorRT call")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("bench", help="measure speed: decode vs roofline, MQTT overhead, or vision",
                       description="Benchmarks report ratios against a roofline or a peer measured in the "
                                   "same run: decode tokens/s against host memory bandwidth / weight bytes; "
                                   "MQTT against in-process generation; INT4 accuracy levels against each other.")
    p.add_argument("engine", help="engine package directory")
    p.add_argument("--mqtt", action="store_true", help="time to first token and tokens/s through mosquitto vs in-process")
    p.add_argument("--vision", action="store_true", help="per-frame preprocessing and vision encoder time")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 896], help="image sides for --vision")
    p.add_argument("--broker-host", help="use this broker for --mqtt (default: start a private mosquitto)")
    p.add_argument("--broker-port", type=int)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the raw report as JSON")
    _add_backend(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="serve engine packages over MQTT (the on-device daemon)",
                       description="Connect to the local MQTT broker and serve text, image and audio requests, "
                                   "watch jobs on cameras and listen jobs on microphones, from one or several "
                                   "packages; see edge_sdk/protocol/PROTOCOL.md for topics and payloads.")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("schema", help="print the JSON Schemas of the MQTT payloads")
    add_schema_arguments(p)
    p.set_defaults(func=run_schema)

    add_flash_commands(sub)

    p = sub.add_parser("devices", help="list device profiles")
    p.set_defaults(func=cmd_devices)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .devices import DeviceError
    from .models.config import CheckpointError
    from .package import PackageError
    from .runtime.types import BackendUnavailable
    from .runtime.types import GenerationError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (CheckpointError, PackageError, DeviceError, BackendUnavailable, GenerationError, ValueError) as exc:
        print(f"edge-sdk {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        return 0


if __name__ == "__main__":
    sys.exit(main())
