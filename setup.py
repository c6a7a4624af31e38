"""Build script. The Python package always installs; the CUDA extension in csrc/ is
built only where a CUDA toolkit and a CUDA build of torch are present, or when
FORCE_CUDA=1 is set."""
from setuptools import find_packages, setup

setup(
    name="nbkernels",
    version="0.1.0",
    description="Fused GPU kernels for neighbor-based losses in deep metric learning",
    packages=find_packages(include=["nbkernels", "nbkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "pytorch-metric-learning"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
    },
)
