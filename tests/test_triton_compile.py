"""The Triton kernels compile for an H100 (sm_90) without one: Triton's NVIDIA
backend lowers them to PTX and its bundled ptxas assembles them, reporting
registers and spills. This catches what the CPU interpreter cannot (tl.dot
shape rules, layouts, register pressure) for the configurations the host
functions pick at the DCN block shapes.

The compile runs in a subprocess: test_triton.py may have switched this
process to the interpreter (TRITON_INTERPRET=1), under which kernels are not
compilable objects.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="needs the triton package")

ORDER = 2  # the paper's N-jet order
N_BASIS, F_PAD = 6, 8
KERNEL_SIZES = (5, 19)  # σ = 0.5 and σ = 4
OUT_CHANNELS = (32, 64, 128)  # DCN block shapes


def _ptxas() -> str | None:
    """The ptxas Triton itself assembles sm_90 code with: it picks the PTX version
    from that binary, so pairing its PTX with another ptxas fails (Triton 3.9 emits
    PTX 9.4 for its CUDA 13.x ptxas; its legacy bundled ptxas is CUDA 12.9).
    ``get_ptxas`` changed shape across releases (no argument / the arch; a tool
    object / a (path, version) pair), hence the fallbacks down to the bundled file."""
    try:
        import inspect

        from triton.backends.nvidia import compiler

        get = compiler.get_ptxas
        tool = get(90) if inspect.signature(get).parameters else get()
        path = tool.path if hasattr(tool, "path") else tool[0]
    except Exception:  # no NVIDIA backend, or an API this test does not know
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if path and os.access(path, os.X_OK) else None


def _compile(fn, constexprs: dict, num_warps: int) -> dict:
    """PTX for sm_90 through Triton, then ptxas -v: registers and spill bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index = {"rows_ptr": "*i64", "cols_ptr": "*i64", "terms_ptr": "*i32"}
    signature = {
        name: "constexpr" if name in constexprs else index.get(name, "*fp32") if name.endswith("_ptr") else "i32"
        for name in fn.arg_names
    }
    signature.update({name: "fp32" for name in ("truncate", "slack") if name in signature})
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    # Tensor-core matrix instructions: mma.sync or, on sm_90, wgmma.
    tensor_cores = re.search(r"^\s*w?gmma\.|^\s*mma\.", compiled.asm["ptx"], re.MULTILINE) is not None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(compiled.asm["ptx"])
    report = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    os.unlink(ptx.name)
    return {
        "kernel": fn.__name__,
        "config": {k: v for k, v in constexprs.items()
                   if k in ("K", "BLOCK_I", "BLOCK_O", "AXIS", "TRANSPOSED", "CORRELATE", "PRECISION")},
        "tensor_cores": tensor_cores,
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
    }


def _report() -> list[dict]:
    from dcn_fast.kernels import srf_conv2d as conv
    from dcn_fast.kernels import srf_taps

    results = []
    for k in KERNEL_SIZES:
        for c_out in OUT_CHANNELS:
            # TF32 (the default: torch.backends.cudnn.allow_tf32) at every shape; IEEE float32 at one.
            for precision in ("tf32", "ieee") if (k, c_out) == (KERNEL_SIZES[0], OUT_CHANNELS[0]) else ("tf32",):
                fwd = conv.forward_config(c_out, F_PAD)
                results.append(_compile(conv._srf_fwd_kernel, dict(
                    K=k, F=N_BASIS, F_PAD=F_PAD, PRECISION=precision, HAS_BIAS=True,
                    **{n: v for n, v in fwd.items() if n != "num_warps"}), fwd["num_warps"]))
                bwd = conv.backward_config(c_out, F_PAD)
                results.append(_compile(conv._srf_bwd_weights_kernel, dict(
                    K=k, F=N_BASIS, F_PAD=F_PAD, PRECISION=precision, NEED_ALPHA=True, NEED_GRAD_RESP=True,
                    **{n: v for n, v in bwd.items() if n != "num_warps"}), bwd["num_warps"]))
        # V; gV with the row-tap gradient; gH (not stored) with the column-tap gradient; grad x.
        for axis, transposed, slots, store, correlate in ((0, False, ORDER + 1, True, False),
                                                          (1, True, ORDER + 1, True, True),
                                                          (0, True, ORDER + 1, False, True),
                                                          (0, True, 1, True, False)):
            results.append(_compile(conv._pass_kernel, dict(
                K=k, AXIS=axis, TRANSPOSED=transposed, J_PAD=triton.next_power_of_2(slots), BLOCK=conv._PASS_BLOCK,
                STORE=store, CORRELATE=correlate, K_PAD=triton.next_power_of_2(k)), 4))
        radius = k // 2
        results.append(_compile(srf_taps._srf_taps_kernel, dict(
            RADIUS=radius, K_PAD=triton.next_power_of_2(k), ORDER=ORDER, TRUNCATE=True), 4))
    return results


@pytest.mark.skipif(_ptxas() is None, reason="this Triton build has no NVIDIA backend with ptxas")
def test_kernels_compile_for_sm90_without_register_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert len(results) == len(KERNEL_SIZES) * (2 * len(OUT_CHANNELS) + 4 + 1) + 2
    spilled = [r for r in results if r["spill_bytes"]]
    assert not spilled, spilled
    # tl.dot in TF32 runs on tensor cores; IEEE float32 dots on the FMA units.
    dots = [r for r in results if "PRECISION" in r["config"]]
    assert all(r["tensor_cores"] == (r["config"]["PRECISION"] == "tf32") for r in dots), dots


if __name__ == "__main__":
    json.dump(_report(), sys.stdout)
