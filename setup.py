# Minimal shim for tools that still call setup.py; everything (metadata, packages) is in pyproject.toml.
from setuptools import setup

setup()
