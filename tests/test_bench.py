"""`edge-sdk bench` runs and reports ratios (speed itself is never asserted: machines are shared)."""

import json
import subprocess
import sys


def test_bench_reports_roofline_fraction_per_accuracy_level(tiny_checkpoints, build_package):
    pkg = build_package(tiny_checkpoints["text"], "int4", block_size=32)
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "bench", str(pkg), "--runs", "1",
                          "--prompt-tokens", "8", "--new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["bandwidth_gb_s"] > 0 and report["weight_mb"] > 0
    assert [r["accuracy_level"] for r in report["runs"]] == [4, 0]
    for run in report["runs"]:
        assert run["decode_tok_s"] > 0
        assert run["roofline_fraction"] == run["decode_tok_s"] / report["roofline_tok_s"]
