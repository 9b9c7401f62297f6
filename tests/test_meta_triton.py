"""σ(t) ODE convolutions on the Triton backend (CPU interpreter here, tiny shapes) against the reference."""

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
from dcn_fast.ode import META_KINDS, TimeConv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("kind", META_KINDS)
def test_meta_time_convolution_on_triton_matches_the_float64_reference(kind):
    torch.manual_seed(0)
    conv = TimeConv(2, 3, kind, backend="triton").to(DEVICE)
    x = torch.randn(1, 2, 6, 5, device=DEVICE)
    for t in (0.0, 1.3, 2.9):
        tt = torch.tensor(t, device=DEVICE)
        scale, alpha = (w.detach().double() for w in conv.meta_weights(tt))
        tx = torch.cat([torch.full_like(x[:, :1], t), x], 1).double()
        want = srf_conv2d(tx, scale, alpha, backend="reference")
        assert rel_err(conv(tt, x), want) < 1e-4, t
