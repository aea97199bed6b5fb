"""Only what pyproject.toml cannot say: cffi builds native._zcnative at install time."""

from setuptools import setup

setup(cffi_modules=["native/_build.py:ffibuilder"])
