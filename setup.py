# Minimal shim for tools that still call setup.py; the package data live in pyproject.toml, which maps the
# repository's kernels/ folder to the subpackage hrmloss.kernels (nothing installs a top-level `kernels`).
from setuptools import setup

setup(package_dir={"hrmloss": "hrmloss", "hrmloss.kernels": "kernels"})
