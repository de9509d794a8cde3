"""Run every benchmark at one scale and print one table of measured ratios (and absolute figures on a GPU).

    python benchmarks/run_all.py --scale tiny              # minutes on a laptop CPU
    python benchmarks/run_all.py --scale real              # SANA 1.6B / DC-AE f32c32 shapes, random weights
    python benchmarks/run_all.py --scale real --device cuda
    python benchmarks/run_all.py --only pipeline data      # a subset
    python benchmarks/run_all.py --only memory --scale real  # quantized / offloaded memory at SANA 1.6B size
    python benchmarks/run_all.py --scale tiny --skip-learning   # a few minutes: no 1500-step learning check

Each benchmark is a script beside this one, run in its own process (so peak-RSS figures do not mix), that ends its
output with one line ``BENCHMARK_RESULTS_JSON: [...]``: a list of rows
``{"benchmark", "metric", "value", "unit", "target", "better"}`` where ``better`` is "lower" or "higher". Ratios are
measured within one run of one script, because these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MARKER = "BENCHMARK_RESULTS_JSON:"
BENCHMARKS = {
    "pipeline": "bench_pipeline.py",
    "data": "bench_data.py",
    "train": "bench_train.py",
    "sharding": "bench_sharding.py",
    "memory": "bench_memory.py",
}
CPU_ONLY = {"sharding"}  # gloo processes on the CPU: left out of a --device cuda run unless named in --only


def emit_results(rows: list[dict]) -> None:
    """Print rows in the format this runner collects (for use by the benchmark scripts)."""
    print(MARKER + " " + json.dumps(rows), flush=True)


def _run(name: str, script: str, scale: str, device: str, extra: list[str]) -> tuple[list[dict], float, str]:
    command = [sys.executable, os.path.join(HERE, script), "--scale", scale, "--device", device, *extra]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    rows: list[dict] = []
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            rows.extend(json.loads(line[len(MARKER):]))
    if result.returncode != 0 or not rows:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        return [], elapsed, f"{name}: exit {result.returncode}, no results\n{tail}"
    return rows, elapsed, ""


def _status(row: dict) -> str:
    target, value = row.get("target"), row.get("value")
    if target is None or value is None:
        return ""
    ok = value <= target if row.get("better") == "lower" else value >= target
    return "ok" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (absolute GPU figures need cuda)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None,
                        help="a subset (default: all; with --device cuda, all but the CPU-only sharding benchmark)")
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    parser.add_argument("--skip-learning", action="store_true",
                        help="train: skip the learning check (1500 CPU steps at tiny scale), keep the overhead run")
    args = parser.parse_args(argv)

    if args.only is None:
        args.only = [name for name in sorted(BENCHMARKS) if args.device == "cpu" or name not in CPU_ONLY]
    all_rows, failures = [], []
    for name in args.only:
        print(f"running {name} ({args.scale}, {args.device}) ...", flush=True)
        extra = ["--skip-learning"] if name == "train" and args.skip_learning else []
        rows, elapsed, error = _run(name, BENCHMARKS[name], args.scale, args.device, extra)
        if error:
            failures.append(error)
        for row in rows:
            row.setdefault("benchmark", name)
        all_rows.extend(rows)
        print(f"  done in {elapsed:.0f} s", flush=True)

    print("\n| benchmark | metric | value | target | status |\n|---|---|---|---|---|")
    for row in all_rows:
        target = row.get("target")
        comparator = "<=" if row.get("better") == "lower" else ">="
        target_text = "" if target is None else f"{comparator} {target:g}"
        print(f"| {row['benchmark']} | {row['metric']} | {row['value']:.4g} {row.get('unit', '')} | {target_text} | "
              f"{_status(row)} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"scale": args.scale, "device": args.device, "rows": all_rows}, handle, indent=2)
    for failure in failures:
        print("\n" + failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
