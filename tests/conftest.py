import re
import shutil

import pytest
import torch

from dcn_fast import ops


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cpu_kernel_or_skip():
    """The C++ kernel must build wherever a compiler and ninja exist; skip (with the reason) elsewhere."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the 'cpu' backend falls back to 'separable'")
    if not is_ninja_available():
        pytest.skip("ninja is not installed (pip install ninja): the 'cpu' backend falls back to 'separable'")
    assert ops.cpu_kernel_available(), f"C++ kernel failed to build: {ops._state.get('error')}"


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string, compared as numbers ("3.10" > "3.6")."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def triton_interpreter_broken() -> str | None:
    """Why Triton's CPU interpreter cannot run here, or None. Triton 3.6's interpreter fails with
    numpy >= 2.4 (the GPU machine's torch 2.11 pins triton 3.6: install "numpy<2.4" with it)."""
    import numpy
    import triton

    if _version(triton.__version__) <= (3, 6) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter does not work with numpy {numpy.__version__} "
                "(>= 2.4); install numpy<2.4 to run the Triton tests off a GPU")
    return None


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest expected magnitude, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture
def cpu_kernel():
    cpu_kernel_or_skip()


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty*, empty_like, empty_strided and Tensor.new_empty return NaN-filled floating tensors,
    so an output element a kernel never writes shows up as NaN."""

    def poisoned(make):
        def wrapper(*args, **kwargs):
            out = make(*args, **kwargs)
            if out.is_floating_point() or out.is_complex():
                with torch.no_grad():
                    out.fill_(float("nan"))
            return out

        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


@pytest.fixture
def ieee_float32():
    """IEEE float32 convolutions and Triton dots (TF32 off), so float32 results can be held to 1e-4."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous
