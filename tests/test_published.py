"""The benchmark's re-implementation of the published layer stack computes what dcn_fast computes."""

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after tests/: its conftest stays the one imported
from published import published_dcn_ode, published_filters  # noqa: E402

from dcn_fast import srf_filters_reference  # noqa: E402
from dcn_fast.models import build  # noqa: E402


def test_published_filters_equal_the_reference():
    for scale in (-1.2, 0.0, 0.7, 1.5):
        s = torch.tensor([scale], dtype=torch.float64)
        a = torch.randn(6, 3, 4, dtype=torch.float64)
        torch.testing.assert_close(published_filters(s, a, 2), srf_filters_reference(s, a, 2), rtol=1e-12, atol=1e-14)


def test_published_dcn_ode_equals_ours():
    published = published_dcn_ode(gradient="backprop", rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    ours = build("dcn-ode", gradient="backprop", rtol=1e-6, atol=1e-6)
    assert published.num_parameters() == ours.num_parameters()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(published(x), ours(x), rtol=1e-4, atol=1e-5)
