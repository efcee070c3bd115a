"""Package metadata for tumorsynth: installs the `toolkit` and `jobs` packages and the `tumorsynth` command."""

from setuptools import find_packages, setup

setup(
    name="tumorsynth",
    version="0.1.0",
    description="Synthetic brain-tumour MR data for segmentation research, at cluster scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["toolkit", "toolkit.*", "jobs", "jobs.*"]),
    install_requires=[
        # The Makefile installs torch==2.13.0 (a local CPU wheel) first; GPU clusters install their CUDA build first.
        "torch>=2.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.8",
        "hdf5plugin>=4.0",
        "nibabel>=5.0",
        "pypng>=0.20220715",
        "nilearn>=0.10",
        "submitit>=1.5",
        "mpi4py>=3.1",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "tensorboard>=2.12",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "ruff>=0.5"],
        # Horovod's sdist needs a C++17 patch to build against torch >= 2.1: `make horovod` builds and installs it.
        "horovod": ["horovod==0.28.1"],
        "keras": ["tensorflow-cpu>=2.16; platform_machine == 'x86_64'",
                  "tensorflow>=2.16; platform_machine != 'x86_64'"],
        "onnx": ["onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.18"],
    },
    entry_points={"console_scripts": ["tumorsynth=toolkit.cli:main"]},
)
