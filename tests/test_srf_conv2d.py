"""srf_conv2d: every backend against the published reference (shared samples), gradients, backend choice."""

import math
import warnings

import pytest
import torch

from conftest import rel_err
from samples import SAMPLE_NAMES, sample_inputs, serves

from dcn_fast import ops
from dcn_fast.basis import num_basis
from dcn_fast.functional import srf_conv2d

CPU_BACKENDS = ["cpu", "dense", "separable"]

pytestmark = pytest.mark.usefixtures("poison_empty")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    if request.param in ("cpu", "dense"):
        from conftest import cpu_kernel_or_skip

        cpu_kernel_or_skip()
    return request.param


def run(backend, sample, tensors=None):
    tensors = sample.tensors if tensors is None else tensors
    return srf_conv2d(*tensors[:3], backend=backend, **sample.optional(tensors), **sample.kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_forward_and_gradients_match_reference(backend, name, dtype, tol):
    (sample,) = sample_inputs(dtype=dtype, requires_grad=True, names=[name])
    if not serves(backend, sample):
        pytest.skip(f"{backend} takes one σ per layer (tested to refuse per-channel σ below)")
    expected = run("reference", sample)
    actual = run(backend, sample)
    assert actual.shape == expected.shape and actual.dtype == dtype and actual.is_contiguous()
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, sample.tensors, grad)
    actual_grads = torch.autograd.grad(actual, sample.tensors, grad)
    if expected.numel() == 0:  # batch 0: empty output, zero gradients of σ, α and bias
        assert all(torch.equal(g, torch.zeros_like(g)) for g in actual_grads)
        return
    assert rel_err(actual, expected) < tol
    labels = ["input", "scale", "alpha"] + list(sample.optional(sample.tensors))
    for label, g, e in zip(labels, actual_grads, expected_grads):
        assert g.shape == e.shape and rel_err(g, e) < tol, label


def test_gradients_of_one_input_only(backend):
    """Each gradient alone (the autograd formula saves and computes only what is asked)."""
    for sample in sample_inputs(names=["batch1-stride2-groups-bias", "per-channel", "per-pair"]):
        if not serves(backend, sample):
            continue
        grad = None
        for i in range(3):
            inputs = [t.clone() for t in sample.tensors[:3]]
            inputs[i].requires_grad_()
            out = run(backend, sample, inputs + sample.tensors[3:])
            ref = run("reference", sample, inputs + sample.tensors[3:])
            grad = torch.randn_like(out) if grad is None else grad
            (g,) = torch.autograd.grad(out, inputs[i], grad)
            (e,) = torch.autograd.grad(ref, inputs[i], grad)
            assert rel_err(g, e) < 1e-10, (sample.name, i)


GRADCHECK_SAMPLES = ["sigma1-odd", "batch1-stride2-groups-bias", "order4-depthwise-mixed-stride", "non-contiguous",
                     "per-channel", "per-pair-order1"]


@pytest.mark.parametrize("name", GRADCHECK_SAMPLES)
def test_gradcheck(backend, name):
    """Every sample kind for dense (the new algorithm), two for the others (their reference test above is
    exhaustive); fast mode (random projections of the Jacobian) keeps it within seconds."""
    (sample,) = sample_inputs(requires_grad=True, names=[name])
    if not serves(backend, sample) or (backend != "dense" and name not in GRADCHECK_SAMPLES[1:3]):
        pytest.skip(f"{backend}: not gradchecked on {name}")
    # Small enough for numerical Jacobians, still odd sizes / stride / groups.
    x = sample.input[:1, :, :10, :9].detach().requires_grad_()
    tensors = [x, *sample.tensors[1:]]
    if sample.shift is not None:  # cropped to the smaller output
        unshifted = [x, *sample.tensors[1:3], *([sample.bias] if sample.bias is not None else [])]
        ho, wo = run(backend, sample, unshifted).shape[-2:]
        tensors[-1] = sample.shift[:, :ho, :wo].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: run(backend, sample, list(t)), tensors, fast_mode=True)


@pytest.mark.parametrize("backend_name", ["cpu", "separable"])
@pytest.mark.parametrize("name", ["per-channel", "per-pair"])
def test_one_sigma_per_layer_backends_refuse_per_channel_sigma(backend_name, name):
    (sample,) = sample_inputs(names=[name])
    with pytest.raises(ValueError, match=f"backend='{backend_name}' takes one σ per layer.*backend='dense'"):
        run(backend_name, sample)


def test_auto_picks_dense_for_per_channel_sigma():
    from dcn_fast.functional import resolve_backend

    x = torch.zeros(1, 2, 8, 8)
    assert resolve_backend("auto", x, sharing="channel") == "dense"
    assert resolve_backend("auto", x, sharing="pair") == "dense"


def test_reference_sigma_ji_normalises_each_pair():
    """σ^ji: fixed 7 taps, each pair's filter equals a one-σ layer at that σ with kernel_size 7."""
    scale = torch.tensor([[-0.5, 0.4]], dtype=torch.float64)
    a = torch.randn(6, 2, 1, dtype=torch.float64)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    out = srf_conv2d(x, scale, a, kernel_size=7, backend="reference")
    parts = [
        srf_conv2d(x[:, i : i + 1], scale[0, i : i + 1], a[:, i : i + 1], kernel_size=7, backend="reference")
        for i in range(2)
    ]
    assert rel_err(out, parts[0] + parts[1]) < 1e-12


def test_auto_picks_cpu_kernel(cpu_kernel):
    from dcn_fast.functional import resolve_backend

    assert resolve_backend("auto", torch.zeros(1)) == "cpu"


def test_without_a_compiler(monkeypatch):
    """No C++ build: one warning; auto uses separable, an explicit 'cpu' raises, 'dense' builds its filter
    with PyTorch ops (same results)."""

    def broken_build(target):
        raise OSError("no compiler")

    monkeypatch.setattr(ops, "_state", {"cpu": {}, "cuda": {}})
    monkeypatch.setattr(ops, "_build", broken_build)
    (sample,) = sample_inputs(requires_grad=True, names=["per-channel"])
    with pytest.warns(RuntimeWarning, match="cpu kernels could not be built.*no compiler"):
        out = run("dense", sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        (layer,) = sample_inputs(names=["sigma1-odd"])
        assert rel_err(run("auto", layer), run("reference", layer)) < 1e-10
        with pytest.raises(ValueError, match="backend='cpu' needs the C\\+\\+ kernel.*no compiler"):
            run("cpu", layer)
        expected = run("reference", sample)
        assert rel_err(out, expected) < 1e-10
        grad = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, sample.tensors, grad),
                             torch.autograd.grad(expected, sample.tensors, grad)):
            assert rel_err(got, want) < 1e-10
        small = [t[:1, :, :7, :6].detach().requires_grad_() if t is sample.input else t for t in sample.tensors]
        assert torch.autograd.gradcheck(lambda *t: run("dense", sample, list(t)), small, fast_mode=True)


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "dense", "separable"])
def test_double_backward_raises_one_clear_error(backend_name):
    """Gradients of gradients: the reference computes them; every fast backend raises (it used to return
    zero gradients for α and σ on the default CPU backend)."""
    (sample,) = sample_inputs(requires_grad=True, names=["sigma1-odd"])
    out = run(backend_name, sample)

    def second_derivatives():
        grads = torch.autograd.grad(out.square().sum(), sample.tensors, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return torch.autograd.grad(penalty, sample.tensors[1:3])

    if backend_name == "reference":
        assert all(g.abs().max() > 0 for g in second_derivatives())
        return
    # σ's closed-form gradient refuses create_graph at once; the op's backward when differentiated.
    with pytest.raises(RuntimeError, match="double backward .* is not supported .* backend='reference'"):
        second_derivatives()


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "dense", "separable"])
def test_second_derivative_in_sigma_raises_or_is_exact(backend_name):
    """σ's gradient goes through the taps' closed form: differentiating it again raised nothing
    and gave 0 on the fast backends (the reference: the true value)."""
    (sample,) = sample_inputs(requires_grad=True, names=["sigma1-odd"])
    x, scale, alpha = (t.detach() for t in sample.tensors[:3])

    def loss(s):
        return srf_conv2d(x, s, alpha, backend=backend_name, **sample.kwargs).square().sum()

    if backend_name == "reference":
        assert torch.autograd.functional.hessian(loss, scale).abs().max() > 0
        return
    with pytest.raises(RuntimeError, match="double backward .* is not supported .* backend='reference'"):
        torch.autograd.functional.hessian(loss, scale)


def test_cpu_backward_is_deterministic(backend):
    (sample,) = sample_inputs(dtype=torch.float32, requires_grad=True, names=["padding-pair"])
    grads = []
    for _ in range(2):
        grads.append(torch.autograd.grad(run(backend, sample).square().sum(), sample.tensors))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


# --- argument errors ------------------------------------------------------

X = torch.randn(1, 3, 8, 8)
S = torch.zeros(1)
A = torch.randn(6, 3, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input=torch.randn(3, 8, 8)), ValueError, "input must be 4-D"),
        (dict(input=torch.randn(1, 2, 8, 8)), ValueError, r"alpha must have shape \[F, C_in/groups, C_out\]"),
        (dict(input=X.long()), TypeError, "input must be a floating-point tensor"),
        (dict(alpha=[1.0]), TypeError, "alpha must be a torch.Tensor"),
        (dict(order=-1), ValueError, "order must be an int >= 0"),
        (dict(order=3), ValueError, r"\[10, 3, C_out\] for order=3"),
        (dict(truncate=0.0), ValueError, "truncate must be a finite number > 0"),
        (dict(truncate=float("nan")), ValueError, "truncate must be a finite number > 0"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
        (dict(padding="full"), ValueError, "padding must be 'same', 'valid'"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(groups=2), ValueError, "groups=2 must divide the input channels"),
        (dict(groups=0), ValueError, "groups must be an int >= 1"),
        (dict(bias=torch.zeros(3)), ValueError, r"bias must be None or a tensor of shape \[4\]"),
        (dict(shift=torch.zeros(4, 8)), ValueError, r"shift must be None or a tensor of shape \[C_out, Ho, Wo\]"),
        (dict(shift=torch.zeros(4, 8, 8), stride=2), ValueError, r"shape \[C_out, Ho, Wo\] = \[4, 4, 4\]"),
        (dict(shift=torch.zeros(4, 8, 8, dtype=torch.long)), TypeError, "shift must be a floating-point tensor"),
        (dict(shift=torch.zeros(4, 8, 8, device="meta")), ValueError, "shift is on meta but input is on cpu"),
        (dict(scale=torch.tensor([float("nan")])), ValueError, "scale .* must be finite"),
        (dict(scale=torch.tensor([float("inf")])), ValueError, "scale .* must be finite"),
        (dict(scale=torch.zeros(2)), ValueError, r"scale must have shape \[1\]"),
        (dict(scale=torch.tensor([6.0])), ValueError, r"scale too large: .* 259 taps; the cap is 129 \(scale <= 4\.989\)"),
        (dict(scale=torch.tensor([1000.0])), ValueError, r"scale too large: .* infinitely many taps"),
        (dict(scale=torch.zeros(4, 3)), ValueError, "needs a fixed kernel_size"),
        (dict(kernel_size=4), ValueError, "kernel_size must be None or an odd int"),
        (dict(kernel_size=131), ValueError, "kernel_size must be <= 129"),
        (dict(padding="valid", scale=torch.tensor([1.5])), ValueError, "smaller than the 15x15 kernel"),
        (dict(scale=torch.tensor([-64.0])), ValueError, r"scale too small: scale = -64 .* allowed range is scale >= -8"),
        (dict(scale=torch.tensor([-8.5])), ValueError, r"scale too small: scale = -8.5 "),
        (dict(backend="cuda"), ValueError,
         "backend must be one of 'auto', 'reference', 'cpu', 'dense', 'separable', 'triton'"),
        (dict(backend="triton"), ValueError, "backend='triton' needs CUDA tensors"),
        (dict(backend="cpu", input=X.double(), alpha=A.double(), scale=torch.zeros(4)), ValueError,
         "backend='cpu' takes one σ per layer"),
    ],
)
def test_errors(kwargs, error, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # test_triton.py sets it on CPU-only machines
    args = dict(input=X, scale=S, alpha=A)
    args.update(kwargs)
    positional = [args.pop(k) for k in ("input", "scale", "alpha")]
    with pytest.raises(error, match=match):
        srf_conv2d(*positional, **args)


@pytest.mark.parametrize("backend_name", ["reference", "separable", "cpu", "dense"])
def test_precomputed_taps(backend_name):
    """srf_taps_for + taps= gives the same result and gradients as building the taps in the call."""
    from dcn_fast.functional import srf_taps_for

    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    a = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    taps = srf_taps_for(s, order=2)
    assert taps.shape == (1, 3, 2 * math.ceil(2 * 2**0.4 + 0.5) + 1)
    shared = srf_conv2d(x, s, a, taps=taps, backend=backend_name, stride=2)
    fresh = srf_conv2d(x, s, a, backend="reference", stride=2)
    assert rel_err(shared, fresh) < 1e-10
    g = torch.randn_like(fresh)
    for got, want in zip(torch.autograd.grad(shared, (s, a), g), torch.autograd.grad(fresh, (s, a), g)):
        assert rel_err(got, want) < 1e-10
    with pytest.raises(ValueError, match="taps must come from srf_taps_for"):
        srf_conv2d(x, s, a, taps=taps[:, :2], backend=backend_name)  # order 1 taps, order 2 call
    with pytest.raises(TypeError, match="taps must be a torch.Tensor .* got list"):
        srf_conv2d(x, s, a, taps=taps.tolist(), backend=backend_name)
    with pytest.raises(ValueError, match="scale .* must be finite"):
        srf_taps_for(torch.tensor([float("-inf")]))
    with pytest.raises(ValueError, match="scale too small"):
        srf_taps_for(torch.tensor([-70.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", [0, 4])
def test_smallest_allowed_scale_is_finite_on_every_backend(dtype, order):
    """At scale = MIN_SCALE every backend gives finite outputs and gradients (float32 overflowed to NaN
    from about -24 at order 4: the reason for the bound)."""
    from dcn_fast.functional import MIN_SCALE

    x = torch.randn(1, 2, 9, 9, dtype=dtype)
    a = torch.randn(num_basis(order), 2, 3, dtype=dtype, requires_grad=True)
    for kernel_size in (None, 7):
        for backend_name in ["reference", *CPU_BACKENDS]:
            s = torch.tensor([MIN_SCALE], dtype=dtype, requires_grad=True)
            out = srf_conv2d(x, s, a, order=order, kernel_size=kernel_size, backend=backend_name)
            grads = torch.autograd.grad(out.sum(), (s, a))
            assert out.isfinite().all() and all(g.isfinite().all() for g in grads), (backend_name, kernel_size)


def test_low_precision_input_on_cpu():
    """bf16 (e.g. a model under autocast) runs through separable; the C++ kernel refuses it clearly."""
    x = torch.randn(1, 3, 8, 8).bfloat16()
    s, a = torch.zeros(1), torch.randn(6, 3, 4).bfloat16()
    out = srf_conv2d(x, s, a)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), srf_conv2d(x.float(), s, a.float(), backend="reference")) < 2e-2
    with pytest.raises(ValueError, match="backend='cpu' computes in float32 or float64"):
        srf_conv2d(x, s, a, backend="cpu")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_under_cpu_autocast(backend_name):
    """Under autocast the op computes in its inputs' promoted dtype (float32 here) and matches the reference."""
    x = torch.randn(2, 4, 9, 9)
    s, a = torch.zeros(1), torch.randn(6, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = srf_conv2d(x.bfloat16(), s, a, backend=backend_name)
    assert out.dtype == torch.float32
    assert rel_err(out, srf_conv2d(x.bfloat16().float(), s, a, backend="reference")) < 1e-5


def test_auto_rule_for_cuda(monkeypatch):
    """CUDA: dense up to K = 11 when its CUDA kernels are built (provisional), then triton where its kernels
    take the call, else separable; per-channel σ: dense (a CUDA-typed stand-in tensor, no GPU needed)."""
    from dcn_fast import functional

    class CudaLike:
        def __init__(self, shape, dtype):
            self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda")

    monkeypatch.setattr(functional, "triton_available", lambda: True)
    monkeypatch.setattr(ops, "cuda_kernel_available", lambda: False)
    x = CudaLike((8, 33, 30, 30), torch.float32)
    resolve = functional.resolve_backend
    assert resolve("auto", x, torch.float32, torch.empty(6, 33, 32), kernel=7) == "triton"
    assert resolve("auto", x, torch.bfloat16, torch.empty(6, 33, 32)) == "triton"
    assert resolve("auto", x, torch.float64, torch.empty(6, 33, 32)) == "separable"
    assert resolve("auto", x, torch.float32, torch.empty(6, 11, 32), groups=3) == "separable"
    assert resolve("auto", x, torch.float32, torch.empty(6, 33, 512)) == "separable"
    assert resolve("auto", x, torch.float32, torch.empty(6, 33, 32), sharing="pair") == "dense"
    monkeypatch.setattr(ops, "cuda_kernel_available", lambda: True)
    assert resolve("auto", x, torch.float32, torch.empty(6, 33, 32), kernel=11) == "dense"
    assert resolve("auto", x, torch.float64, torch.empty(6, 33, 32), kernel=5) == "dense"
    assert resolve("auto", x, torch.float32, torch.empty(6, 33, 32), kernel=13) == "triton"
    monkeypatch.setattr(functional, "triton_available", lambda: False)
    assert resolve("auto", x, torch.float32, torch.empty(6, 33, 32), kernel=13) == "separable"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "shape, stride, groups",
    [((2, 3, 4, 70, 31), 1, 1), ((1, 4, 6, 75, 29), (2, 1), 2), ((3, 2, 2, 41, 60), 2, 1),
     ((7, 3, 5, 9, 8), 1, 1), ((5, 4, 6, 11, 10), 2, 2), ((40, 2, 3, 6, 6), 1, 1)],
    ids=["stride1", "stride21-groups", "stride2", "whole-images", "whole-images-stride2-groups", "whole-images-capped"],
)
def test_cpu_kernel_across_tiles(shape, stride, groups, threads, cpu_kernel):
    """The tiled kernel where an image spans several tiles (forward tiles of ~1024 output pixels, backward
    ones of ~512 in an even and an odd sweep; a small batch cut further, one tile per thread), and where
    the forward puts several whole small images in a tile (as many as ~1024 pixels allow, the tiles shared
    evenly by the threads, the last one shorter), float64."""
    gen = torch.Generator().manual_seed(1)
    b, c_in, c_out, h, w = shape
    x = torch.randn(b, c_in, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)  # σ = 1.74: K = 9
    alpha = torch.randn(num_basis(2), c_in // groups, c_out, dtype=torch.float64, generator=gen, requires_grad=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = [srf_conv2d(x, scale, alpha, stride=stride, groups=groups, backend=name) for name in ("cpu", "reference")]
        grad = torch.randn(outs[0].shape, dtype=torch.float64, generator=gen)
        actual, expected = (torch.autograd.grad(out, (x, scale, alpha), grad) for out in outs)
    finally:
        torch.set_num_threads(previous)
    assert rel_err(outs[0], outs[1]) < 1e-10
    for label, g, e in zip(("input", "scale", "alpha"), actual, expected):
        assert rel_err(g, e) < 1e-10, label


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_reused_buffers_hold_no_stale_values(threads, dtype, tol, cpu_kernel):
    """Each thread keeps its tile buffers between calls: what a previous call left there (other shapes,
    non-finite values) never reaches a result. A call on NaN inputs with more channels and a larger
    image; then finite calls against the reference: 19 channels (unused lanes with AVX2 and AVX-512,
    float32 and float64) at stride (2, 1), and one whose basis responses pass the 4 MiB a thread
    keeps in float64 (90 channels, forward tiles of 16 rows of 64: a buffer of its own for that call)."""
    gen = torch.Generator().manual_seed(3)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scale = torch.tensor(0.8, dtype=dtype, requires_grad=True)
        poisoned = torch.full((3, 37, 23, 21), float("nan"), dtype=dtype, requires_grad=True)
        alpha = torch.full((num_basis(2), 37, 5), float("nan"), dtype=dtype, requires_grad=True)
        out = srf_conv2d(poisoned, scale, alpha, backend="cpu")
        torch.autograd.grad(out, (poisoned, scale, alpha), torch.full_like(out, float("nan")))
        for shape, c_out, stride in (((4, 19, 11, 9), 6, (2, 1)), ((1, 90, 64, 64), 3, 1)):
            x = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype).requires_grad_()
            alpha = torch.randn(num_basis(2), shape[1], c_out, dtype=torch.float64, generator=gen).to(dtype)
            alpha.requires_grad_()
            outs = [srf_conv2d(x, scale, alpha, stride=stride, backend=name) for name in ("cpu", "reference")]
            grad = torch.randn(outs[0].shape, dtype=torch.float64, generator=gen).to(dtype)
            # σ's gradient in float64 only: in float32 it cancels to ~1e-3 in every backend.
            wrt = (x, alpha, scale) if dtype == torch.float64 else (x, alpha)
            actual, expected = (torch.autograd.grad(o, wrt, grad) for o in outs)
            assert torch.isfinite(outs[0]).all() and rel_err(outs[0], outs[1]) < tol, shape
            for label, g, e in zip(("input", "alpha", "scale"), actual, expected):
                assert torch.isfinite(g).all() and rel_err(g, e) < tol, (shape, label)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "shape, stride, groups",
    [((3, 4, 33, 9, 7), 1, 1), ((2, 6, 34, 20, 19), 2, 2), ((1, 3, 16, 40, 37), 1, 1), ((2, 2, 1, 6, 5), 1, 1)],
    ids=["33-outputs-whole-images", "17-per-group-stride2", "16-outputs-row-tiles", "one-output"],
)
def test_cpu_kernel_output_blocks(shape, stride, groups, dtype, tol, cpu_kernel):
    """The forward writes each tile's pixel-major GEMM result into the NCHW output one lane x lane block
    (16 x 16 in float32, 8 x 8 in float64 with AVX-512) transposed in registers, and the channels and
    pixels past whole blocks element by element, adding the bias and the shift on the way: output
    channels per group that are and are not a multiple of the lane (1, 16, 17, 33), pixel counts that
    are not (63, 100, 37 per row), tiles of several images and tiles of a few rows, against the reference."""
    gen = torch.Generator().manual_seed(5)
    b, c_in, c_out, h, w = shape
    x = torch.randn(b, c_in, h, w, dtype=torch.float64, generator=gen).to(dtype).requires_grad_()
    scale = torch.tensor(0.8, dtype=dtype, requires_grad=True)  # σ = 1.74: K = 9
    alpha = torch.randn(num_basis(2), c_in // groups, c_out, dtype=torch.float64, generator=gen).to(dtype)
    bias = torch.randn(c_out, dtype=torch.float64, generator=gen).to(dtype).requires_grad_()
    ho, wo = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    shift = torch.randn(c_out, ho, wo, dtype=torch.float64, generator=gen).to(dtype).requires_grad_()
    alpha.requires_grad_()
    for addends in (dict(), dict(bias=bias), dict(bias=bias, shift=shift)):
        outs = [srf_conv2d(x, scale, alpha, stride=stride, groups=groups, backend=name, **addends)
                for name in ("cpu", "reference")]
        assert outs[0].shape == (b, c_out, ho, wo)
        assert rel_err(outs[0], outs[1]) < tol, sorted(addends)
    grad = torch.randn(outs[0].shape, dtype=torch.float64, generator=gen).to(dtype)
    wrt = (x, alpha, bias, shift)
    actual, expected = (torch.autograd.grad(out, wrt, grad) for out in outs)
    for label, g, e in zip(("input", "alpha", "bias", "shift"), actual, expected):
        assert rel_err(g, e) < tol, label


@pytest.mark.parametrize("backend_name", ["reference", *CPU_BACKENDS])
def test_planned_call_equals_srf_conv2d(backend_name):
    """plan_srf_conv2d checks a call once; the plan, run again on new inputs of the planned shape (as an
    ODE solve's evaluations), gives srf_conv2d's outputs and gradients (taps given and not, a shift and
    a bias, stride 2, float64), and refuses an input of another shape."""
    from dcn_fast.functional import plan_srf_conv2d, srf_taps_for

    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(num_basis(2), 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    kwargs = dict(stride=2, bias=bias, backend=backend_name)
    for taps in (None, srf_taps_for(scale)):
        x0 = torch.randn(2, 3, 11, 9, dtype=torch.float64, generator=gen)
        call = plan_srf_conv2d(x0, scale, alpha, taps=taps, **kwargs)
        for _ in range(2):
            x = torch.randn(2, 3, 11, 9, dtype=torch.float64, generator=gen, requires_grad=True)
            shift = torch.randn(5, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
            outs = [call(x, shift), srf_conv2d(x, scale, alpha, taps=taps, shift=shift, **kwargs)]
            assert rel_err(outs[0], outs[1]) < 1e-12
            grad = torch.randn(outs[0].shape, dtype=torch.float64, generator=gen)
            wrt = (x, scale, alpha, bias, shift)
            actual, expected = (torch.autograd.grad(out, wrt, grad, retain_graph=True) for out in outs)
            for label, g, e in zip(("input", "scale", "alpha", "bias", "shift"), actual, expected):
                assert rel_err(g, e) < 1e-12, label
        planned = r"input must match the planned input \(\[2, 3, 11, 9\] torch.float64 on cpu\), got "
        with pytest.raises(ValueError, match=planned + r"\[2, 3, 11, 10\] torch.float64"):
            call(torch.randn(2, 3, 11, 10, dtype=torch.float64))
        with pytest.raises(ValueError, match=planned + r"\[2, 3, 11, 9\] torch.float32"):
            call(torch.randn(2, 3, 11, 9))
        with pytest.raises(ValueError, match=planned + r"\[2, 3, 11, 9\] torch.float64 on meta"):
            call(torch.empty(2, 3, 11, 9, dtype=torch.float64, device="meta"))
        with pytest.raises(ValueError, match="shift must be None or a tensor of shape"):
            call(x0, torch.zeros(6, 5, dtype=torch.float64))  # [Ho, Wo]: no broadcast on any backend


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_planned_call_refuses_changed_weights_and_a_missing_graph(backend_name):
    """An SRFCall keeps the weights as planned: after one of them changes in place (an optimizer step)
    a call raises instead of mixing old taps with the new alpha; a plan made without gradients refuses
    a call that needs them (its taps carry no graph to σ) and serves calls without them."""
    from dcn_fast.functional import plan_srf_conv2d

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=gen)
    scale = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(num_basis(2), 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    call = plan_srf_conv2d(x, scale, alpha, backend=backend_name)
    call(x)
    for weight in (alpha, scale):
        with torch.no_grad():
            weight.add_(0.01)
        with pytest.raises(RuntimeError, match=r"changed in place since it was planned: plan again"):
            call(x)
        call = plan_srf_conv2d(x, scale, alpha, backend=backend_name)
        assert rel_err(call(x), srf_conv2d(x, scale, alpha, backend=backend_name)) < 1e-12
    with torch.no_grad():
        call = plan_srf_conv2d(x, scale, alpha, backend=backend_name)
        assert rel_err(call(x), srf_conv2d(x, scale, alpha, backend=backend_name)) < 1e-12
    with pytest.raises(RuntimeError, match=r"planned with gradients disabled and is called with them enabled"):
        call(x)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "shape, stride, groups",
    [((2, 16, 3, 5, 16), 1, 1), ((1, 34, 4, 6, 21), (1, 2), 2), ((2, 35, 2, 4, 33), 1, 1), ((1, 16, 3, 4, 15), 1, 1)],
    ids=["16-channels-16-wide", "17-per-group-21-wide-stride12", "35-channels-33-wide", "15-wide"],
)
def test_cpu_kernel_input_blocks(shape, stride, groups, dtype, tol, cpu_kernel):
    """The kernel lays each input row out channels-innermost one lane x lane block (channels x columns,
    16 x 16 in float32, 8 x 8 in float64 with AVX-512) transposed in registers, the last block of a row
    overlapping the one before, and the channels past whole lanes (and rows narrower than a lane)
    element by element: rows of 15, 16, 21 and 33 columns, 16, 17 and 35 channels per group, forward
    and gradients (the backward lays out its tiles the same way) against the reference."""
    gen = torch.Generator().manual_seed(11)
    b, c_in, c_out, h, w = shape
    x = torch.randn(b, c_in, h, w, dtype=torch.float64, generator=gen).to(dtype).requires_grad_()
    scale = torch.tensor(0.3, dtype=torch.float64).to(dtype).requires_grad_()  # σ = 1.23: K = 7
    alpha = torch.randn(num_basis(2), c_in // groups, c_out, dtype=torch.float64, generator=gen).to(dtype)
    alpha.requires_grad_()
    outs = [srf_conv2d(x, scale, alpha, stride=stride, groups=groups, backend=name) for name in ("cpu", "reference")]
    assert rel_err(outs[0], outs[1]) < tol
    grad = torch.randn(outs[0].shape, dtype=torch.float64, generator=gen).to(dtype)
    wrt = (x, alpha, scale) if dtype == torch.float64 else (x, alpha)  # σ's float32 gradient: see above
    actual, expected = (torch.autograd.grad(out, wrt, grad) for out in outs)
    for label, g, e in zip(("input", "alpha", "scale"), actual, expected):
        assert rel_err(g, e) < tol, label
