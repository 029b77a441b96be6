"""Build script: packages, package data, and (issue 5) the optional C++/CUDA extension.

Metadata lives in pyproject.toml. The Triton kernels in ``kernels/`` install as the
top-level package ``minitron_kernels`` (importable by other compression tools).

C++/CUDA extension ``minitron._C`` (ops ``torch.ops.minitron.*``, see minitron/ops/gather.py):
  * built against the *installed* torch -- use ``pip install -e . --no-build-isolation``
    (build isolation would make pip fetch another torch; nothing is downloaded here);
  * CPU sources when a C++ compiler is found; CUDA sources too only when
    ``torch.version.cuda`` is set and a CUDA toolkit is found (CUDA_HOME);
  * a failed build only warns: the package still installs and minitron.ops builds the
    extension JIT on first use, or runs its pure-PyTorch fallback;
  * ``MINITRON_NO_EXT=1`` skips the extension entirely.
"""

import os
import shutil
import warnings

from setuptools import find_packages, setup

packages = find_packages(include=["minitron", "minitron.*"])
packages += ["minitron_kernels"] + [
    "minitron_kernels." + p for p in find_packages(where="kernels")
]


def _extension_config():
    """Return (ext_modules, cmdclass) for minitron._C, or ([], {}) if it cannot be built."""
    if os.environ.get("MINITRON_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # torch not importable (e.g. build isolation): skip, JIT later
        warnings.warn(f"minitron: torch not importable at build time ({e}); skipping the C++ extension")
        return [], {}
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        warnings.warn(f"minitron: no C++ compiler ({cxx}) found; skipping the C++ extension")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("csrc")
    cxx_flags = ["-O3"]  # C++ standard: whatever this torch requires (c++17/20)
    if torch.version.cuda and CUDA_HOME is not None:
        ext = CUDAExtension(
            "minitron._C",
            sources=[os.path.join(csrc, f) for f in ("gather_cpu.cpp", "gather_cuda.cpp", "gather_cuda_kernel.cu")],
            include_dirs=[os.path.join(here, csrc)],
            define_macros=[("MINITRON_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    else:
        ext = CppExtension(
            "minitron._C",
            sources=[os.path.join(csrc, "gather_cpu.cpp")],
            include_dirs=[os.path.join(here, csrc)],
            extra_compile_args={"cxx": cxx_flags},
        )

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failure warns instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build error must not fail install
                warnings.warn(f"minitron: building the C++ extension failed ({e}); "
                              "it will be JIT-built on first use or the PyTorch fallback is used")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"minitron: building {ext.name} failed ({e}); continuing without it")

        def get_outputs(self):  # editable/wheel steps must not expect a missing .so
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extension_config()

setup(
    packages=packages,
    package_dir={"minitron_kernels": "kernels"},
    package_data={"minitron": ["assets/*.txt", "assets/*/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
