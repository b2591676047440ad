"""Kept for tools that still look for setup.py; the build is pyproject.toml
(PEP 517/660), which pip uses whenever it is present."""

from setuptools import setup

setup()
