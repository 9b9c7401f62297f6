"""dcn_fast installs as pure Python: the C++/CUDA kernels (csrc/) are compiled on
first use by torch.utils.cpp_extension against the torch that is installed,
so there is no build step, no build isolation trouble and no ABI mismatch."""

from pathlib import Path

from setuptools import setup

here = Path(__file__).parent

setup(
    name="dcn_fast",
    version="0.1.0",
    description="Fast structured-receptive-field (Gaussian N-jet) convolutions and Deep Continuous Networks",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dcn_fast", "dcn_fast.data", "dcn_fast.experiments", "dcn_fast.csrc", "dcn_fast.kernels"],
    # The C++ sources ship inside the package so an installed wheel can build them
    # too; the Triton kernels (kernels/) import as dcn_fast.kernels.
    package_dir={"dcn_fast.csrc": "csrc", "dcn_fast.kernels": "kernels"},
    package_data={"dcn_fast.csrc": ["*.h", "cpu/*.cpp", "cuda/*.cu"], "dcn_fast.data": ["cifar10-sample.tar.xz"]},
    install_requires=["torch>=2.11,<3", "torchdiffeq>=0.2.3", "ninja", "numpy", "pillow", "tqdm", "matplotlib>=3.5"],
    # torchvision: the drop-in example (a ResNet-18); onnx + onnxscript: the ONNX export test
    # (torch.onnx.export's exporter needs onnxscript; the test skips, saying so, without them).
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "torchvision", "onnx", "onnxscript"]},
    entry_points={"console_scripts": ["dcn-fast = dcn_fast.cli:main"]},
)
