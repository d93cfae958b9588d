"""Packaging that pyproject.toml cannot say: the top-level `kernels/` ships inside the wheel.

The catalog and config fragments stay in `kernels/` (where the docs, the
sessions and reviewers look); the wheel carries the same files as the package
`ktstr._kernels`, which `ktstr.paths.kernels_dir` reads when there is no checkout.
Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ktstr", "ktstr.*"]), "ktstr._kernels"],
    package_dir={"ktstr._kernels": "kernels"},
)
