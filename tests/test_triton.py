"""The Triton backend: on a GPU when there is one, else under Triton's CPU interpreter (tiny shapes)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are decorated (dcn_fast.kernels is imported lazily).
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package")
if not torch.cuda.is_available():
    from conftest import triton_interpreter_broken

    if triton_interpreter_broken():
        pytest.skip(triton_interpreter_broken(), allow_module_level=True)

from conftest import rel_err  # noqa: E402

from dcn_fast import srf_conv2d  # noqa: E402
from dcn_fast.basis import num_basis  # noqa: E402
from dcn_fast.functional import srf_taps_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("ieee_float32")

# (batch, c_in, c_out, height, width, order, scale, stride, padding)
CASES = [
    (2, 3, 5, 7, 9, 2, 0.0, 1, "same"),
    (1, 4, 3, 11, 10, 1, 0.5, 2, "valid"),
    (2, 2, 4, 6, 7, 3, -0.8, (2, 1), "same"),
    (1, 17, 18, 5, 5, 2, -1.5, 1, 1),  # more channels than one block (16)
    (1, 3, 4, 8, 9, 0, 0.3, (1, 2), "same"),  # order 0: one basis function
    (1, 2, 3, 9, 8, 4, 1.8, 2, "same"),  # order 4 (F = 15) and σ = 3.5: K = 17 > 16
]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_float64_reference(case):
    batch, c_in, c_out, h, w, order, scale, stride, padding = case
    x = torch.randn(batch, c_in, h, w, device=DEVICE, requires_grad=True)
    s = torch.tensor([scale], device=DEVICE, requires_grad=True)
    a = torch.randn(num_basis(order), c_in, c_out, device=DEVICE, requires_grad=True)
    kwargs = dict(order=order, stride=stride, padding=padding)
    out = srf_conv2d(x, s, a, backend="triton", **kwargs)
    wide = [t.detach().double().requires_grad_() for t in (x, s, a)]
    want = srf_conv2d(*wide, backend="reference", **kwargs)
    assert out.shape == want.shape and out.dtype == torch.float32

    assert rel_err(out, want) < 1e-4  # float32 dots in IEEE precision (TF32 off: ieee_float32)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (x, s, a), grad.float())
    expected = torch.autograd.grad(want, wide, grad)
    for name, g, e in zip(("input", "scale", "alpha"), got, expected):
        assert rel_err(g, e) < 1e-4, name


@pytest.mark.parametrize("wanted", ["input", "scale", "alpha"])
def test_one_gradient_at_a_time(wanted):
    """The backward computes only what is asked for (the kernels skip V, H, G or the partial sums)."""
    tensors = {
        "input": torch.randn(1, 3, 6, 6, device=DEVICE),
        "scale": torch.tensor([0.2], device=DEVICE),
        "alpha": torch.randn(6, 3, 4, device=DEVICE),
    }
    tensors[wanted].requires_grad_()
    (g,) = torch.autograd.grad(srf_conv2d(*tensors.values(), backend="triton").square().sum(), tensors[wanted])
    wide = {name: t.detach().double().requires_grad_(name == wanted) for name, t in tensors.items()}
    (e,) = torch.autograd.grad(srf_conv2d(*wide.values(), backend="reference").square().sum(), wide[wanted])
    assert rel_err(g, e) < 1e-4


def test_precomputed_taps_and_refusals():
    x = torch.randn(1, 4, 6, 6, device=DEVICE)
    s = torch.zeros(1, device=DEVICE)
    taps = srf_taps_for(s)
    out = srf_conv2d(x, s, torch.randn(6, 4, 3, device=DEVICE), backend="triton", taps=taps)
    assert out.shape == (1, 3, 6, 6)
    with pytest.raises(ValueError, match="triton backend does not take this call: groups != 1"):
        srf_conv2d(x, s, torch.randn(6, 2, 4, device=DEVICE), groups=2, backend="triton")
    with pytest.raises(ValueError, match="triton backend does not take this call: dtype torch.float64"):
        srf_conv2d(x.double(), s.double(), torch.randn(6, 4, 3, device=DEVICE).double(), backend="triton")


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        srf_conv2d(torch.randn(1, 2, 5, 5), torch.zeros(1), torch.randn(6, 2, 2), backend="triton")


def test_every_output_element_is_written(poison_empty):
    """Outputs and gradient buffers start as NaN: an element a kernel skips would show."""
    x = torch.randn(2, 3, 7, 6, device=DEVICE, requires_grad=True)
    s = torch.tensor([0.2], device=DEVICE, requires_grad=True)
    a = torch.randn(6, 3, 5, device=DEVICE, requires_grad=True)
    out = srf_conv2d(x, s, a, backend="triton", stride=2)
    grads = torch.autograd.grad(out.square().sum(), (x, s, a))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_scale_changing_between_calls():
    """A new σ means new taps and another K: no state is kept between calls."""
    x = torch.randn(1, 3, 9, 9, device=DEVICE)
    a = torch.randn(6, 3, 4, device=DEVICE)
    for scale in (0.0, 1.2, -0.7):
        s = torch.tensor([scale], device=DEVICE)
        torch.testing.assert_close(
            srf_conv2d(x, s, a, backend="triton"), srf_conv2d(x, s, a, backend="reference"), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("order, radius, truncate", [(0, 2, 2.0), (2, 3, 2.0), (4, 9, 2.0), (3, 3, None)])
def test_taps_kernel_matches_the_pytorch_construction(order, radius, truncate):
    """σ → taps and ∂taps/∂scale in one launch, against dcn_fast.basis in float64 (σ from 0.35 to 4;
    a σ whose published radius exceeds ``radius`` gives NaN in both)."""
    from dcn_fast.basis import _SRFTaps
    from dcn_fast.kernels.srf_taps import srf_taps_triton

    scale = torch.tensor([-1.5, -0.2, 0.6, 1.3, 2.0], device=DEVICE, requires_grad=True)
    got = srf_taps_triton(scale, order, radius, truncate)
    wide = scale.detach().double().requires_grad_()
    want = _SRFTaps.apply(wide, order, radius, truncate)
    assert got.shape == want.shape == (5, order + 1, 2 * radius + 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, equal_nan=True)
    grad = torch.randn_like(want)
    (g,) = torch.autograd.grad(got, scale, grad.float())
    (e,) = torch.autograd.grad(want, wide, grad)
    torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_autocast_reads_the_input_in_bfloat16():
    """Under autocast the kernels take the input in the autocast dtype and return it; α stays float32."""
    x = torch.randn(1, 3, 8, 8, device=DEVICE, requires_grad=True)
    s = torch.zeros(1, device=DEVICE, requires_grad=True)
    a = torch.randn(6, 3, 4, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = srf_conv2d(x, s, a, backend="triton")
    assert out.dtype == torch.bfloat16
    want = srf_conv2d(x.detach().bfloat16().double(), s.detach().double(), a.detach().double(), backend="reference")
    assert rel_err(out, want) < 1e-2  # bf16 output rounding; the input is exact in bf16 here
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32 and torch.isfinite(s.grad).all()


def test_sizes_past_the_kernels_indexing_are_refused():
    """int32 offsets and grid limits: such calls are named and refused, never run wrong (shapes only)."""
    from dcn_fast.kernels.srf_conv2d import supports

    alpha = (6, 256, 8)
    assert supports((128, 256, 64, 64), torch.float32, alpha, 1) is None
    assert "2^31" in supports((1024, 256, 64, 64), torch.float32, alpha, 1)
    assert "batch > 65535" in supports((70000, 256, 1, 1), torch.float32, alpha, 1)


@pytest.mark.parametrize("shifted", [False, True])
def test_bias_is_added_in_the_kernel(shifted):
    """The forward kernel adds the bias; its gradient is gy summed over batch and pixels. A shift
    (added after the kernel) gets gy summed over the batch."""
    x = torch.randn(2, 3, 7, 8, device=DEVICE, requires_grad=True)
    s = torch.tensor([0.3], device=DEVICE, requires_grad=True)
    a = torch.randn(6, 3, 5, device=DEVICE, requires_grad=True)
    bias = torch.randn(5, device=DEVICE, requires_grad=True)
    leaves = [x, s, a, bias] + ([torch.randn(5, 4, 4, device=DEVICE, requires_grad=True)] if shifted else [])
    out = srf_conv2d(*leaves[:3], bias=bias, shift=leaves[4] if shifted else None, stride=2, backend="triton")
    wide = [t.detach().double().requires_grad_() for t in leaves]
    want = srf_conv2d(*wide[:3], bias=wide[3], shift=wide[4] if shifted else None, stride=2, backend="reference")
    assert rel_err(out, want) < 1e-5
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, leaves, grad.float())
    expected = torch.autograd.grad(want, wide, grad)
    for name, g, e in zip(("input", "scale", "alpha", "bias", "shift"), got, expected):
        assert rel_err(g, e) < 1e-4, name


def test_ode_time_convolution_on_triton():
    """TimeConv (an ODE block's conv of [t, x]) on triton matches separable, gradients included."""
    from dcn_fast.ode import TimeConv

    torch.manual_seed(0)
    convs = [TimeConv(3, 4, kind="srf", backend=b).to(DEVICE) for b in ("triton", "separable")]
    convs[1].load_state_dict(convs[0].state_dict())
    x = torch.randn(2, 3, 6, 7, device=DEVICE)
    t = torch.tensor(0.3, device=DEVICE)
    outs = [conv(t, x) for conv in convs]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), list(conv.parameters())) for out, conv in zip(outs, convs)]
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_backward_launches_five_kernels_and_two_reductions(monkeypatch):
    """What the backward asks of the GPU, counted on the host (the kernels stubbed): the V pass, the weights
    kernel, three 1-D passes, and two reductions — α's partial sums, and both taps' partial sums in one
    buffer. tests/test_gpu.py counts the launches of a whole layer call with the CUDA profiler."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dcn_fast.kernels import srf_conv2d as kernels

    launched = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.name)

    for name in ("_pass_kernel", "_srf_bwd_weights_kernel"):
        monkeypatch.setattr(kernels, name, Stub(name))
    no_kernel = {"empty.memory_format", "slice.Tensor", "select.int", "split_with_sizes.default", "split.Tensor",
                 "unsqueeze.default", "view.default", "alias.default", "detach.default"}

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._opname + "." + func._overloadname not in no_kernel:
                launched.append(func._opname)
            return func(*args, **(kwargs or {}))

    x, taps, alpha = torch.randn(2, 3, 9, 9), torch.randn(3, 7), torch.randn(6, 3, 4)
    grad_out = torch.randn(2, 4, 9, 9)
    args = (grad_out, x, taps, alpha, 2, (1, 1), (3, 3), (True, True, True))
    kernels.backward(*args)  # fills the host caches of pass terms and basis pairs (made once per device)
    launched.clear()
    with Ops():
        kernels.backward(*args)
    assert sorted(launched) == sorted(["_pass_kernel"] * 4 + ["_srf_bwd_weights_kernel", "sum", "sum"])


def test_double_backward_raises_one_clear_error():
    x = torch.randn(1, 2, 6, 6, device=DEVICE, requires_grad=True)
    s = torch.tensor([0.1], device=DEVICE, requires_grad=True)
    a = torch.randn(6, 2, 3, device=DEVICE, requires_grad=True)
    out = srf_conv2d(x, s, a, backend="triton")
    # σ's closed-form gradient may refuse create_graph at once; the op's backward when differentiated.
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        grads = torch.autograd.grad(out.square().sum(), (x, s, a), create_graph=True)
        torch.autograd.grad(sum(g.square().sum() for g in grads), (s, a))


def test_per_channel_sigma_is_refused():
    x = torch.randn(1, 2, 6, 6, device=DEVICE)
    with pytest.raises(ValueError, match="backend='triton' takes one σ per layer"):
        srf_conv2d(x, torch.zeros(3, device=DEVICE), torch.randn(6, 2, 3, device=DEVICE), backend="triton")


def test_float32_dots_follow_the_cudnn_tf32_flag():
    """tl.dot runs in TF32 exactly when cuDNN convolutions may (torch.backends.cudnn.allow_tf32, default on);
    the matmul flag does not matter. Tensor cores in the PTX: tests/test_triton_compile.py."""
    from dcn_fast.kernels.srf_conv2d import _precision

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        assert _precision() == "tf32"
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
        assert _precision() == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
