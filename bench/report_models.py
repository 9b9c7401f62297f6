"""Markdown table of bench/test_model_step.py and bench/test_solver_step.py results.

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
    published = next((t for info, t in rows if info["model"] == "published-dcn-ode"
                      and info.get("gradient", "adjoint" if info.get("adjoint") else "backprop") == "adjoint"), None)
    print(f"Machine: {machine.get('gpu') or machine.get('cpu_model')}, torch {machine.get('torch')}, "
          f"{machine.get('torch_threads')} threads, commit {machine.get('commit')}; batch {rows[0][0]['batch']}\n")
    gpu = rows[0][0].get("peak_memory_mib") is not None
    memory = "peak MiB" if gpu else "autograd-saved peak MiB"
    print(f"| model | gradient | solver | backend | s / step | vs published | NFE fwd / bwd | {memory} |")
    print("|---|---|---|---|---|---|---|---|")
    for info, t in rows:
        if "nfe_backward" not in info:  # a no-grad forward (bench/test_solver_step.py)
            continue
        speedup = f"{published / t:.1f}×" if published else "–"
        peak = info.get("peak_memory_mib") if gpu else info.get("saved_tensors_peak_mib")
        mem = f"{peak:.0f}" if peak is not None else "–"
        # Files written before gradient= existed record adjoint: bool.
        gradient = info.get("gradient") or ("adjoint" if info.get("adjoint") else "backprop")
        solver = info.get("solver", "torchdiffeq" if info["model"] == "published-dcn-ode" else "–")
        print(f"| {info['model']} | {gradient} | {solver} | {info.get('backend', 'auto')} | "
              f"{t:.2f} | {speedup} | "
              f"{info['nfe_forward']} / {info['nfe_backward']} | {mem} |")
    forwards = [(info, t) for info, t in rows if "nfe_backward" not in info]
    if forwards:
        print(f"\n| no-grad forward | solver | batch | s | NFE |")
        print("|---|---|---|---|---|")
        for info, t in forwards:
            print(f"| {info['model']} | {info['solver']} | {info['batch']} | {t:.2f} | {info['nfe_forward']} |")


if __name__ == "__main__":
    main()
