"""Build script: packages, package data, and (issue 5) the optional C++/CUDA extension.

Metadata lives in pyproject.toml. The Triton kernels live in ``kernels/minitron_kernels/`` and install
as the top-level package ``minitron_kernels`` (importable by other compression tools). ``kernels/`` is
only a source folder, never a package: ``kernels`` is the import name of Hugging Face's PyPI package,
which transformers imports, so a ``kernels`` package here would shadow it whenever the checkout root
is on ``sys.path`` (tests/test_import_names.py guards every top-level name of the repo).

C++/CUDA extension ``minitron._C`` (ops ``torch.ops.minitron.*``, see minitron/ops/gather.py):
  * built against the *installed* torch -- use ``pip install -e . --no-build-isolation``
    (build isolation would make pip fetch another torch; nothing is downloaded here);
  * CPU sources when a C++ compiler is found; CUDA sources too only when
    ``torch.version.cuda`` is set and a CUDA toolkit is found (CUDA_HOME);
  * a failed build only warns: the package still installs and minitron.ops builds the
    extension JIT on first use, or runs its pure-PyTorch fallback;
  * ``MINITRON_NO_EXT=1`` skips the extension entirely.
Sources, defines and flags come from ``minitron/ops/build_spec.py`` (shared with the JIT loader);
``csrc/`` also ships inside the package as ``minitron/_csrc`` so an installed wheel can JIT-build.
"""

import os
import runpy
import shutil
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# read by path: importing minitron here would import torch-heavy modules (and may not work yet)
SPEC = runpy.run_path(os.path.join(HERE, "minitron", "ops", "build_spec.py"))

packages = find_packages(include=["minitron", "minitron.*"])
packages += find_packages(where="kernels", include=["minitron_kernels", "minitron_kernels.*"])
packages += ["minitron." + SPEC["PACKAGED_CSRC"]]  # the C++/CUDA sources, as package data


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

    csrc = "csrc"
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None
    common = dict(
        sources=[os.path.join(csrc, f) for f in SPEC["sources"](with_cuda)],
        include_dirs=[os.path.join(HERE, csrc)],
    )
    if with_cuda:  # the define comes in through the flags, as in the JIT build
        ext = CUDAExtension(SPEC["NAME"], **common,
                            extra_compile_args={"cxx": SPEC["cxx_flags"](True), "nvcc": SPEC["nvcc_flags"]()})
    else:
        ext = CppExtension(SPEC["NAME"], **common, extra_compile_args={"cxx": SPEC["cxx_flags"](False)})

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
    package_dir={"minitron_kernels": "kernels/minitron_kernels", "minitron." + SPEC["PACKAGED_CSRC"]: "csrc"},
    package_data={
        "minitron": ["assets/*.txt", "assets/*/*"],
        "minitron." + SPEC["PACKAGED_CSRC"]: ["*.cpp", "*.cu", "*.h", "*.sh"],
    },
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
