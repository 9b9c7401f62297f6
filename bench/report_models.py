"""Markdown table of bench/test_model_step.py results.

    python bench/report_models.py bench/results/models-cpu.json
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="output of pytest --benchmark-json")
    data = json.load(open(parser.parse_args(argv).json_file, encoding="utf-8"))
    machine = data["machine_info"]
    rows = [(b["extra_info"], b["stats"]["median"]) for b in data["benchmarks"]]
    published = next((t for info, t in rows if info["model"] == "published-dcn-ode"), None)
    print(f"Machine: {machine.get('gpu') or machine.get('cpu_model')}, torch {machine.get('torch')}, "
          f"{machine.get('torch_threads')} threads, commit {machine.get('commit')}; batch {rows[0][0]['batch']}\n")
    print("| model | gradient | backend | s / step | vs published | NFE fwd / bwd | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for info, t in rows:
        speedup = f"{published / t:.1f}×" if published else "–"
        mem = f"{info['peak_memory_mib']:.0f}" if info.get("peak_memory_mib") else "–"
        print(f"| {info['model']} | {'adjoint' if info['adjoint'] else 'backprop'} | {info.get('backend', 'auto')} | "
              f"{t:.2f} | {speedup} | "
              f"{info['nfe_forward']} / {info['nfe_backward']} | {mem} |")


if __name__ == "__main__":
    main()
