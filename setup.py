"""Install monai-elvis: ``pip install -e ".[test]"``."""

from pathlib import Path

from setuptools import find_packages, setup

# Pinned to the versions the test suite runs with (see README, "Tested versions").
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "monai==1.6.1",
    "fire==0.7.1",  # python -m monai.bundle needs it
    "pytorch-ignite==0.5.5",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "nibabel==5.4.2",
    "pydicom==3.0.2",
    "pyyaml==6.0.3",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "scipy==1.17.1",
    "tensorboard==2.21.0",
    "tqdm==4.70.1",
]

setup(
    name="monai-elvis",
    version="0.1.0",
    description="ELVIS: locality-preserving vision-language pre-training for chest X-rays, as MONAI components and bundles",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["monai_elvis", "monai_elvis.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "study": ["matplotlib==3.10.8"],
        "test": ["pytest==9.0.3", "pydicom-data==1.0.0", "matplotlib==3.10.8"],
    },
)
