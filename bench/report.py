"""Markdown table of a pytest-benchmark JSON: median per backend, speedups over the baseline
(`published` where measured, else `reference`) and the time of `triton` relative to cuDNN 3x3.

    python bench/report.py bench/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="output of pytest --benchmark-json")
    args = parser.parse_args(argv)
    with open(args.json_file, encoding="utf-8") as f:
        data = json.load(f)
    rows: dict[tuple, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["layer"], info["sigma"], info.get("passes", "forward+backward"))
        rows[key][info["backend"]] = bench["stats"]["median"] * 1e3
    machine = data["machine_info"]
    measured = {b for r in rows.values() for b in r}
    base = "published" if "published" in measured else "reference"
    backends = sorted(measured, key=lambda b: (b != base, b))
    print(
        f"Machine: {machine.get('cpu_model') or machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"{machine.get('torch_threads')} threads, GPU {machine.get('gpu')}, torch {machine.get('torch')}, "
        f"commit {machine.get('commit')}, {data.get('datetime', '')[:10]}\n"
    )
    others = [b for b in backends if b != base]
    versus_cudnn = {"triton", "cudnn3x3"} <= measured
    header = ["layer", "σ", "pass"] + [f"{b} ms" for b in backends] + [f"{base}/{b}" for b in others]
    header += ["triton/cudnn3x3"] if versus_cudnn else []
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (layer, sigma, passes), times in sorted(rows.items()):
        cells = [layer, f"{sigma:g}", passes] + [f"{times[b]:.2f}" if b in times else "–" for b in backends]
        cells += [f"{times[base] / times[b]:.1f}×" if b in times and base in times else "–" for b in others]
        if versus_cudnn:
            cells.append(f"{times['triton'] / times['cudnn3x3']:.2f}" if {"triton", "cudnn3x3"} <= times.keys() else "–")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
