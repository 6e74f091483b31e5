"""Build script: the Python package, the Triton kernels (as fastpref.kernels) and, later, csrc/."""
from setuptools import find_packages, setup

setup(
    name="fastpref",
    version="0.1.0",
    description="Preference-alignment losses from hidden states, without materializing logits",
    python_requires=">=3.10",
    packages=find_packages(include=["fastpref", "fastpref.*"]) + ["fastpref.kernels"],
    package_dir={"fastpref": "fastpref", "fastpref.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest"]},
)
