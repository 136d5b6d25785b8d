"""Install monai-elvis: ``pip install -e ".[test]"`` (the supported ranges), or
``pip install -c constraints.txt -e ".[test]"`` (the exact versions the tests run with, as CI does)."""

from pathlib import Path

from setuptools import find_packages, setup

# The versions monai-elvis supports: ranges, so that it installs into an existing MONAI environment without
# replacing its torch. The exact set the test suite runs with is constraints.txt (CI: pip install -c constraints.txt).
# Floors: torch 2.8 and transformers 5.5 are MONAI 1.6's own floors; numpy 1.26 and pydicom 2.4 are those of the
# MONAI Label environment (monailabel_app/requirements.txt), where the bundles are tested with torch 2.14.1, the
# newest torch tested, hence the torch ceiling. Other ceilings stop at the next major (or, before 1.0, minor) release.
INSTALL_REQUIRES = [
    "torch>=2.8,<2.15",
    "monai>=1.6,<1.7",
    "fire>=0.5,<1",  # python -m monai.bundle needs it
    "pytorch-ignite>=0.5,<0.6",
    "transformers>=5.5,<6",
    "tokenizers>=0.23,<0.24",
    "nibabel>=5,<6",
    "pydicom>=2.4,<4",  # pydicom 2 beside monailabel (which needs pydicom<3), 3 otherwise
    "pyyaml>=6,<7",
    "numpy>=1.26,<3",
    "pillow>=10.1,<14",
    "scipy>=1.11,<2",
    "tensorboard>=2.15,<3",
    "tqdm>=4.66,<5",
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
        "study": ["matplotlib>=3.8,<4"],
        "test": ["pytest>=8,<10", "pydicom-data>=1,<2", "matplotlib>=3.8,<4", "jsonschema>=4.18,<5"],
    },
)
