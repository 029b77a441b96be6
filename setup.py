"""Build script: packages, package data, and (issue 5) the optional C++/CUDA extension.

Metadata lives in pyproject.toml. The Triton kernels in ``kernels/`` install as the
top-level package ``minitron_kernels`` (importable by other compression tools).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["minitron", "minitron.*"])
packages += ["minitron_kernels"] + [
    "minitron_kernels." + p for p in find_packages(where="kernels")
]

setup(
    packages=packages,
    package_dir={"minitron_kernels": "kernels"},
    package_data={"minitron": ["assets/*.txt", "assets/*/*"]},
    include_package_data=True,
)
