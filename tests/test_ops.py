"""The dcn_fast ops themselves: opcheck for every op and algorithm, the dense filter kernels, build (torch.compile: test_compile.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cpu_kernel_or_skip, rel_err
from samples import sample_inputs, serves

import dcn_fast.functional  # noqa: F401  (registers the dense and separable algorithms)
from dcn_fast import build, dense, ops
from dcn_fast.basis import srf_taps
from dcn_fast.reference import srf_filters_reference

pytestmark = pytest.mark.usefixtures("poison_empty")

ALGORITHMS = ["cpu", "dense", "separable"]
OP_SAMPLES = ["sigma1-odd", "batch1-stride2-groups-bias", "non-contiguous", "batch0", "per-channel", "per-pair"]


@pytest.fixture(autouse=True)
def _kernels():
    cpu_kernel_or_skip()


def op_args(sample, algorithm, requires_grad):
    """Arguments of torch.ops.dcn_fast.srf_conv2d for ``sample``: taps [T_o, T_i, N+1, K]."""
    from dcn_fast.functional import _validate

    kw = sample.kwargs
    spec = _validate(sample.input, sample.scale, sample.alpha, kw["order"], 2.0, kw["stride"], kw["padding"],
                     kw["groups"], sample.bias, kw["kernel_size"], None)
    taps = srf_taps(sample.scale, kw["order"], spec.radius, None if kw["kernel_size"] else 2.0)
    c_out = sample.alpha.shape[2]
    taps = taps.reshape(*((c_out, -1) if sample.sharing != "layer" else (1, 1)), *taps.shape[-2:]).detach()
    tensors = [t.detach().requires_grad_(requires_grad) if t is not None else None
               for t in (sample.input, taps, sample.alpha, sample.bias, sample.shift)]
    return (*tensors, list(spec.stride), list(spec.padding), kw["groups"], algorithm)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_opcheck_srf_conv2d(algorithm, requires_grad):
    for sample in sample_inputs(names=OP_SAMPLES):
        if serves(algorithm, sample):
            torch.library.opcheck(torch.ops.dcn_fast.srf_conv2d.default, op_args(sample, algorithm, requires_grad))


def test_opcheck_building_blocks():
    for sample in sample_inputs(names=["batch1-stride2-groups-bias", "per-pair"]):
        x, taps, alpha, bias, shift, stride, padding, groups, _ = op_args(sample, "dense", False)
        out = torch.ops.dcn_fast.srf_dense_conv2d(x, taps, alpha, bias, stride, padding, groups)
        grad_out = torch.randn_like(out)
        filter = torch.ops.dcn_fast.srf_dense_filter(taps, alpha)
        checks = [
            (torch.ops.dcn_fast.srf_dense_filter.default, (taps, alpha)),
            (torch.ops.dcn_fast.srf_dense_filter_backward.default, (torch.randn_like(filter), taps, alpha, [True, True])),
            (torch.ops.dcn_fast.srf_dense_filter_backward.default, (torch.randn_like(filter), taps, alpha, [False, True])),
            (torch.ops.dcn_fast.srf_dense_conv2d.default, (x, taps, alpha, bias, stride, padding, groups)),
            (torch.ops.dcn_fast.srf_dense_conv2d_backward.default,
             (grad_out, x, taps, alpha, stride, padding, groups, [True, True, False])),
            (torch.ops.dcn_fast.srf_conv2d_backward.default,
             (grad_out, x, taps, alpha, stride, padding, groups, "dense", [False, True, True])),
        ]
        if sample.sharing == "layer":
            checks += [
                (torch.ops.dcn_fast.srf_tiled_conv2d.default, (x, taps[0, 0], alpha, bias, shift, stride, padding,
                                                               groups)),
                (torch.ops.dcn_fast.srf_tiled_conv2d.default, (x, taps[0, 0], alpha, None, None, stride, padding,
                                                               groups)),
                (torch.ops.dcn_fast.srf_tiled_conv2d_backward.default,
                 (grad_out, x, taps[0, 0], alpha, stride, padding, groups, [True, False, True])),
            ]
        for op, args in checks:
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("order", range(5))
@pytest.mark.parametrize("sharing", ["layer", "channel", "pair"])
def test_dense_filter_matches_the_published_filters(sharing, order, dtype, tol):
    """The one-pass filter kernel against srf_filters_reference; its gradients against autograd through it."""
    from dcn_fast.basis import num_basis
    from dcn_fast.separable import dense_filters

    c_in, c_out = 3, 5
    shape = {"layer": (1,), "channel": (c_out,), "pair": (c_out, c_in)}[sharing]
    scale = torch.linspace(-1.3, 1.2, max(1, shape[0] * (shape[1] if len(shape) > 1 else 1)), dtype=dtype)
    scale = scale.reshape(shape)
    alpha = torch.randn(num_basis(order), c_in, c_out, dtype=dtype)
    kernel_size = 7 if sharing == "pair" else None
    expected = srf_filters_reference(scale, alpha, order, 2.0, kernel_size)
    radius = expected.shape[-1] // 2
    taps = srf_taps(scale, order, radius, None if kernel_size else 2.0)
    taps = taps.reshape(*((c_out, -1) if sharing != "layer" else (1, 1)), *taps.shape[-2:])
    filter = torch.ops.dcn_fast.srf_dense_filter(taps, alpha)
    assert rel_err(filter, expected) < tol

    grad_filter = torch.randn_like(filter)
    grad_taps, grad_alpha = torch.ops.dcn_fast.srf_dense_filter_backward(grad_filter, taps, alpha, [True, True])
    leaves = [taps.clone().requires_grad_(), alpha.clone().requires_grad_()]
    want_taps, want_alpha = torch.autograd.grad(dense_filters(*leaves, order), leaves, grad_filter)
    assert rel_err(grad_taps, want_taps) < tol and rel_err(grad_alpha, want_alpha) < tol
    fallback_taps, fallback_alpha = dense._filter_backward_torch(grad_filter, taps, alpha, True, True)
    assert rel_err(fallback_taps, want_taps) < tol and rel_err(fallback_alpha, want_alpha) < tol
    again = torch.ops.dcn_fast.srf_dense_filter_backward(grad_filter, taps, alpha, [True, True])
    assert torch.equal(again[0], grad_taps) and torch.equal(again[1], grad_alpha)  # deterministic


def test_op_refuses_an_addend_on_another_device():
    """A meta bias or shift with a CPU input would route the call to the fake kernel (an uninitialised result)."""
    (sample,) = sample_inputs(names=["batch1-stride2-groups-bias"])
    x, taps, alpha, bias, shift, *rest = op_args(sample, "cpu", False)
    for name, args in (("bias", (bias.to("meta"), shift)), ("shift", (bias, shift.to("meta")))):
        with pytest.raises(RuntimeError, match=f"{name} is on meta but input is on cpu"):
            torch.ops.dcn_fast.srf_conv2d(x, taps, alpha, *args, *rest)


def test_cpu_op_casts_its_addends_to_the_input_dtype():
    """A float32 bias or shift with a float64 input: the cpu algorithm casts them, as it cast the bias before."""
    (sample,) = sample_inputs(names=["batch1-stride2-groups-bias"])
    x, taps, alpha, bias, shift, *rest = op_args(sample, "cpu", False)
    narrow = torch.ops.dcn_fast.srf_conv2d(x, taps, alpha, bias.float(), shift.float(), *rest)
    wide = torch.ops.dcn_fast.srf_conv2d(x, taps, alpha, bias.float().double(), shift.float().double(), *rest)
    assert narrow.dtype == torch.float64 and torch.equal(narrow, wide)


def test_op_refuses_what_an_algorithm_cannot_serve():
    (layer,) = sample_inputs(names=["sigma1-odd"])
    (pair,) = sample_inputs(names=["per-pair"])
    with pytest.raises(ValueError, match="the 'separable' algorithm takes one σ per layer"):
        torch.ops.dcn_fast.srf_conv2d(*op_args(pair, "separable", False))
    with pytest.raises(ValueError, match="algorithm must be one of .*'dense'"):
        torch.ops.dcn_fast.srf_conv2d(*op_args(layer, "cuda", False))
    # (triton on CPU tensors without the interpreter: test_srf_conv2d.py::test_errors; importing the
    # kernels here would decorate them before test_triton.py can choose the interpreter)


# --- building ---------------------------------------------------------------


def test_build_cpu_on_request():
    result = subprocess.run([sys.executable, "-m", "dcn_fast.build", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cpu kernels built" in result.stdout


def test_build_refuses_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "dcn_fast.build", "cuda", "--arch", "sm90"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "--arch takes a compute capability" in result.stderr


@pytest.mark.skipif(build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc with libcudart) on this machine")
def test_build_cuda_on_request_without_a_gpu():
    """The CUDA dense kernels compile for sm_90 with nvcc alone (no GPU needed): exit status 0."""
    result = subprocess.run([sys.executable, "-m", "dcn_fast.build", "cuda", "--arch", "9.0"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuda kernels built" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the build takes its architecture")
@pytest.mark.skipif(build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc with libcudart) on this machine")
def test_build_cuda_without_a_gpu_asks_for_arch():
    result = subprocess.run([sys.executable, "-m", "dcn_fast.build", "cuda"], capture_output=True, text=True)
    assert result.returncode == 1 and "pass --arch" in result.stderr


def test_find_cuda_home_skips_a_wrapper_nvcc(tmp_path, monkeypatch):
    """An nvcc wrapper script first on PATH (no libcudart beside it) is not taken for the toolkit."""
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\nexit 1\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    found = build.find_cuda_home()
    assert found != tmp_path
    real = [Path(p) for p in ["/usr/local/cuda"] if (Path(p) / "bin" / "nvcc").is_file()]
    if real and shutil.which("nvcc"):
        assert found is not None and (found / "bin" / "nvcc").is_file()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert build.find_cuda_home() == tmp_path  # an explicit CUDA_HOME is honoured
