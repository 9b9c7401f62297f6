"""torch.compile(fullgraph=True): srf_conv2d(..., taps=...) on every backend, SRFConv2d and one ODE
function evaluation, through backend="aot_eager" (dynamo + AOTAutograd) and "inductor" (generated code),
forward and backward against eager.

All of it compiles on torch 2.11 and on the newest torch (README, "Supported versions"); a version that
could not would be marked here by version. The Triton backend runs in a subprocess: off a GPU it needs
Triton's interpreter, whose TRITON_INTERPRET=1 must be set before Triton is first imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import cpu_kernel_or_skip, rel_err, triton_interpreter_broken

from dcn_fast import SRFConv2d, srf_conv2d
from dcn_fast.basis import OUTGROWN_RADIUS_ERROR
from dcn_fast.functional import srf_taps_for
from dcn_fast.ode import ODEFunc

COMPILERS = ["aot_eager", "inductor"]
TOL = 1e-4  # float32: eager and generated code round differently (inductor fuses and reorders)


@pytest.fixture(autouse=True)
def fresh_dynamo_cache():
    """Each test compiles from an empty cache: the parametrised tests share their functions' code
    objects, and with fullgraph=True dynamo's recompile limit (8 per code object) is a hard error."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _compiler(name: str) -> str:
    if name == "inductor" and shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor generates C++ for the CPU: no C++ compiler on this machine")
    return name


def _call(x, s, a, b, taps, backend):
    return srf_conv2d(x, s, a, bias=b, taps=taps, backend=backend, stride=(1, 2))


def _inputs(device="cpu"):
    """Random float32 inputs at odd sizes: x [2, 3, 9, 11], one σ, α [6, 3, 5], a bias."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 11, generator=gen)
    s = torch.tensor([0.4])
    a = torch.randn(6, 3, 5, generator=gen) * 0.3
    b = torch.randn(5, generator=gen)
    return [t.to(device).requires_grad_() for t in (x, s, a, b)]


def _check_against_eager(fn, inputs, leaves):
    """fn(*inputs) compiled == eager, and the gradients of every leaf of a non-linear loss."""
    got = fn[1](*inputs)
    want = fn[0](*inputs)
    assert got.shape == want.shape
    assert rel_err(got, want) < TOL
    weight = torch.randn_like(want)
    # retain_graph: both calls may share graph outside them (taps built once from σ).
    grads = torch.autograd.grad((got.tanh() * weight).sum(), leaves, retain_graph=True)
    wants = torch.autograd.grad((want.tanh() * weight).sum(), leaves)
    for g, w in zip(grads, wants):
        assert rel_err(g, w) < TOL


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", ["reference", "cpu", "dense", "separable", "auto"])
def test_srf_conv2d_with_taps_compiles_as_one_graph(backend, compiler):
    if backend in ("cpu", "dense"):
        cpu_kernel_or_skip()
    x, s, a, b = _inputs()
    taps = srf_taps_for(s)  # outside the graph: differentiable in s

    def f(x, a, b, taps):
        return _call(x, s, a, b, taps, backend)

    compiled = torch.compile(f, fullgraph=True, backend=_compiler(compiler))
    _check_against_eager((f, compiled), (x, a, b, taps), (x, s, a, b))


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_srf_module_compiles_as_one_graph(padding, compiler):
    torch.manual_seed(0)
    layer = SRFConv2d(3, 5, bias=True, stride=(2, 1), padding=padding)
    with torch.no_grad():
        layer.scale.fill_(-0.3)  # K = 5: "valid" leaves an output
        layer.bias.normal_()
    x = torch.randn(2, 3, 11, 9, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=_compiler(compiler))
    _check_against_eager((layer, compiled), (x,), (x, *layer.parameters()))


@pytest.mark.parametrize("kind, compiler", [("srf", "aot_eager"), ("srf", "inductor"), ("sigma_t", "aot_eager"),
                                            ("srf_pair", "aot_eager")])
def test_one_ode_function_evaluation_compiles_as_one_graph(kind, compiler):
    torch.manual_seed(0)
    func = ODEFunc(4, kind=kind, norm_groups=2)
    h = torch.randn(2, 4, 9, 7, requires_grad=True)
    t = torch.tensor(0.7)
    compiled = torch.compile(func, fullgraph=True, backend=_compiler(compiler))
    _check_against_eager((func, compiled), (t, h), (h, *func.parameters()))
    assert func.nfe == 2  # the counter is a side effect dynamo replays: one compiled and one eager call


def _traced_layer(new_scale: float, **options):
    """An SRFConv2d (3 → 4), compiled and traced on one call; then its scale set to ``new_scale``."""
    torch.manual_seed(0)
    layer = SRFConv2d(3, 4, **options)
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x)
    with torch.no_grad():
        layer.scale.fill_(new_scale)
    return layer, compiled, x


def test_a_compiled_layer_keeps_its_traced_radius_and_refuses_a_larger_one():
    """The graph holds the radius of σ when it was traced: a σ that shrank is exact under "same" padding
    (zeros past its own radius), one that outgrew it raises (CPU) instead of truncating its filter."""
    layer, compiled, x = _traced_layer(-1.0, init_scale=0.0, learn_scale=False)  # σ = 0.5: eager's K is smaller
    assert layer.kernel_size[0] < 7
    assert rel_err(compiled(x), layer(x)) < TOL
    with torch.no_grad():
        layer.scale.fill_(1.0)  # σ = 2: past the traced radius
    with pytest.raises(RuntimeError, match="outgrew the tap radius this torch.compile graph was traced with"):
        compiled(x)
    assert "torch.compiler.reset()" in OUTGROWN_RADIUS_ERROR


@pytest.mark.parametrize("kernel_size", [None, 3])
@pytest.mark.parametrize("scale", [-30.0, -9.0, float("nan"), float("inf")])
def test_a_compiled_layer_refuses_a_scale_out_of_range(scale, kernel_size):
    """Eager raises ValueError where it reads σ back; the graph, which read it once, checks in-graph (CPU):
    never NaN outputs or a silently zero σ gradient."""
    layer, compiled, x = _traced_layer(scale, order=4, kernel_size=kernel_size)
    with pytest.raises(ValueError, match="scale"):
        layer(x)
    with pytest.raises(RuntimeError, match=r"NaN, inf or below -8; the allowed range is finite scale >= -8"):
        compiled(x)


def test_a_compiled_layer_without_same_padding_refuses_any_other_radius():
    """With padding other than "same" K sets the output size, so a smaller σ must not run at the traced K."""
    torch.manual_seed(0)
    layer = SRFConv2d(3, 4, init_scale=0.0, learn_scale=False, padding="valid")
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert compiled(x).shape == layer(x).shape
    with torch.no_grad():
        layer.scale.fill_(-1.0)
    with pytest.raises(RuntimeError, match="outgrew the tap radius"):
        compiled(x)


# --- the op itself, float64 (a strided, grouped call with a bias) -----------------------------------


@pytest.mark.parametrize("algorithm", ["cpu", "dense", "separable"])
def test_op_under_torch_compile_fullgraph(algorithm):
    from samples import sample_inputs
    from test_ops import op_args

    cpu_kernel_or_skip()
    (sample,) = sample_inputs(names=["batch1-stride2-groups-bias"])
    x, taps, alpha, bias, shift, stride, padding, groups, _ = op_args(sample, algorithm, True)
    leaves = (x, taps, alpha, bias, shift)

    def f(*leaves):
        return torch.ops.dcn_fast.srf_conv2d(*leaves, stride, padding, groups, algorithm).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(*leaves), f(*leaves)
    assert rel_err(got, want) < 1e-12
    for g, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert rel_err(g, e) < 1e-12


@pytest.mark.parametrize("backend", ["cpu", "dense", "separable"])
def test_functional_under_torch_compile_fullgraph(backend):
    """With precomputed taps (no host read of σ) srf_conv2d compiles as one graph, backward included."""
    from samples import sample_inputs

    if backend in ("cpu", "dense"):
        cpu_kernel_or_skip()
    (sample,) = sample_inputs(requires_grad=True, names=["batch1-stride2-groups-bias"])
    x, s, a, b, shift = sample.tensors
    taps = srf_taps_for(s, order=sample.kwargs["order"])

    def f(x, taps, a, b, shift):
        return srf_conv2d(x, s, a, bias=b, taps=taps, backend=backend, shift=shift, **sample.kwargs).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, taps, a, b, shift), f(x, taps, a, b, shift)
    assert rel_err(got, want) < 1e-12
    leaves = (x, s, a, b, shift)
    for g, e in zip(torch.autograd.grad(got, leaves, retain_graph=True), torch.autograd.grad(want, leaves)):
        assert rel_err(g, e) < 1e-12


# --- fresh processes --------------------------------------------------------------------------------

FRESH = """
import sys, torch
import dcn_fast
assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules, "importing dcn_fast imported them"
from dcn_fast import srf_conv2d
from dcn_fast.functional import srf_taps_for
s = torch.zeros(1)
x, a = torch.randn(2, 3, 9, 11), torch.randn(6, 3, 4)
f = torch.compile(lambda x, a, t: srf_conv2d(x, s, a, backend="cpu", taps=t), fullgraph=True, backend="aot_eager")
t = srf_taps_for(s)
torch.testing.assert_close(f(x, a, t), srf_conv2d(x, s, a, backend="cpu", taps=t))
"""


def test_compile_of_the_cpu_backend_in_a_fresh_process():
    """The first call of a process decides whether the C++ kernels load, under a lock, which dynamo
    cannot trace ("Unsupported context manager" on torch 2.14.1 and 2.15): the decision is made
    outside the graph. Also: importing dcn_fast imports neither Triton nor torch._dynamo (which
    imports Triton), so TRITON_INTERPRET set after the import still takes effect."""
    cpu_kernel_or_skip()
    run = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def _triton_cases() -> dict:
    """Run in a subprocess (see the module docstring): each compiler's errors against eager, as JSON."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for compiler in COMPILERS:
        x, s, a, b = _inputs(device)
        taps = srf_taps_for(s)

        def f(x, a, b, taps):
            return _call(x, s, a, b, taps, "triton")

        compiled = torch.compile(f, fullgraph=True, backend=compiler)
        got, want = compiled(x, a, b, taps), f(x, a, b, taps)
        weight = torch.randn_like(want)
        leaves = (x, s, a, b)
        grads = torch.autograd.grad((got.tanh() * weight).sum(), leaves, retain_graph=True)
        wants = torch.autograd.grad((want.tanh() * weight).sum(), leaves)
        results[compiler] = [rel_err(got, want)] + [rel_err(g, w) for g, w in zip(grads, wants)]
    return results


def test_the_triton_backend_compiles_as_one_graph():
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        reason = triton_interpreter_broken()
        if reason:
            pytest.skip(reason)
        env["TRITON_INTERPRET"] = "1"  # before Triton's first import: in the child
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("inductor generates C++ for the CPU: no C++ compiler on this machine")
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(results) == COMPILERS
    for compiler, errors in results.items():
        assert len(errors) == 5 and max(errors) < TOL, (compiler, errors)


if __name__ == "__main__":
    torch.backends.cudnn.allow_tf32 = False  # IEEE float32 on a GPU, so that 1e-4 holds
    print(json.dumps(_triton_cases()))
