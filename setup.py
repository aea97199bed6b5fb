"""Only what pyproject.toml cannot say: cffi builds zcmigrate.native._zcnative at install
time, and this script, which sits in the package's directory (the checkout's root), is
not itself part of the package."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):  # type: ignore[misc]
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "zcmigrate" and m[1] == "setup")]


setup(cffi_modules=["native/_build.py:ffibuilder"], cmdclass={"build_py": BuildPy})
