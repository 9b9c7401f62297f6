"""The 1-D taps, the reference filter, and the analytic σ gradient."""

import math

import pytest
import torch

from dcn_fast import srf_filters_reference
from dcn_fast.basis import basis_pairs, num_basis, srf_taps

# ĝ(x) = exp(-x²/2) / Σ exp(-x²/2) on x = -3..3 (σ = 1, truncate 2 → r = 3), written out.
G_HAT_SIGMA1 = [
    0.004433048175243745,
    0.054005582622414484,
    0.2420362293761143,
    0.3990502796524549,
    0.2420362293761143,
    0.054005582622414484,
    0.004433048175243745,
]


def expected_taps_sigma1():
    """σ = 1, order 2: b0 = ĝ, b1 = -x ĝ, b2 = (x² - 1) ĝ (Hermite polynomials worked out by hand)."""
    xs = range(-3, 4)
    g = torch.tensor(G_HAT_SIGMA1, dtype=torch.float64)
    x = torch.tensor(list(xs), dtype=torch.float64)
    return torch.stack([g, -x * g, (x * x - 1) * g])


def test_basis_order_and_count():
    assert basis_pairs(2) == [(0, 2), (0, 1), (0, 0), (1, 1), (1, 0), (2, 0)]
    assert [num_basis(n) for n in range(5)] == [1, 3, 6, 10, 15]


def test_taps_sigma1_written_out():
    taps = srf_taps(torch.zeros(1, dtype=torch.float64), 2, 3, 2.0)[0]
    torch.testing.assert_close(taps, expected_taps_sigma1(), rtol=1e-13, atol=1e-15)


def test_reference_filters_sigma1_written_out():
    """Each basis function of the published construction, picked out by a one-hot α."""
    expected = expected_taps_sigma1()
    alpha = torch.eye(6, dtype=torch.float64).reshape(6, 1, 6)  # output o = basis o
    weight = srf_filters_reference(torch.zeros(1, dtype=torch.float64), alpha, order=2)
    assert weight.shape == (6, 1, 7, 7)
    for f, (l, m) in enumerate(basis_pairs(2)):
        torch.testing.assert_close(weight[f, 0], torch.outer(expected[l], expected[m]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("sigma, radius", [(0.5, 2), (1.0, 3), (2.0, 5), (0.3, 2), (6.0, 13)])
def test_published_radius(sigma, radius):
    alpha = torch.randn(6, 1, 1, dtype=torch.float64)
    weight = srf_filters_reference(torch.tensor([math.log2(sigma)], dtype=torch.float64), alpha, order=2)
    assert weight.shape[-1] == 2 * radius + 1


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("scale", [-1.7, 0.0, 1.3, 2.58])
def test_taps_match_reference(order, scale):
    s = torch.tensor([scale], dtype=torch.float64)
    radius = math.ceil(2.0 * 2**scale + 0.5)
    taps = srf_taps(s, order, radius, 2.0)[0]
    pairs = basis_pairs(order)
    alpha = torch.eye(len(pairs), dtype=torch.float64).reshape(len(pairs), 1, len(pairs))
    weight = srf_filters_reference(s, alpha, order=order)
    for f, (l, m) in enumerate(pairs):
        torch.testing.assert_close(weight[f, 0], torch.outer(taps[l], taps[m]), rtol=1e-10, atol=1e-14)


def test_radius_bound_zeroes_outer_taps():
    """A larger radius than needed adds zero taps only: the no-sync contract of the GPU kernels."""
    s = torch.tensor([0.0], dtype=torch.float64)
    exact = srf_taps(s, 3, 3, 2.0)[0]
    padded = srf_taps(s, 3, 6, 2.0)[0]
    torch.testing.assert_close(padded[:, 3:-3], exact, rtol=0, atol=0)
    assert padded[:, :3].abs().max() == 0 and padded[:, -3:].abs().max() == 0


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1,), (3,), (2, 3)])
@pytest.mark.parametrize("truncate", [2.0, None])
def test_taps_gradcheck(order, shape, truncate):
    # σ from ~0.3 to ~6 across the entries; radius covers the largest.
    scale = torch.linspace(-1.7, 2.5, math.prod(shape), dtype=torch.float64).reshape(shape).requires_grad_()
    radius = 13 if truncate else 4
    assert torch.autograd.gradcheck(lambda s: srf_taps(s, order, radius, truncate), (scale,))


def test_taps_double_backward_is_refused():
    """At the gradient taken with create_graph=True: differentiating it again would give a silent 0."""
    scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported .* backend='reference'"):
        torch.autograd.grad(srf_taps(scale, 2, 3, 2.0).pow(2).sum(), scale, create_graph=True)
