"""How the C++/CUDA extension ``minitron._C`` is built: one description for ``setup.py`` and the JIT loader.

Plain data and path helpers, no torch import: ``setup.py`` reads this file by path
(``runpy.run_path``) before minitron is importable. Source paths are relative to the
``csrc/`` directory, which ships inside the package as ``minitron/_csrc`` (package data) so an
installed wheel can still JIT-build the extension.
"""

from __future__ import annotations

from pathlib import Path

NAME = "minitron._C"  # the prebuilt module (setup.py)
JIT_NAME = "minitron_C_jit"  # the JIT-built module (minitron.ops._loader)
CPU_SOURCES = ("gather_cpu.cpp", "kd_cpu.cpp", "kd_cpu_avx512.cpp")
CUDA_SOURCES = ("gather_cuda.cpp", "gather_cuda_kernel.cu")
HEADERS = ("gather_plan.h",)
CUDA_DEFINE = "MINITRON_WITH_CUDA"  # set when the CUDA sources are compiled in
# Version of what the library registers. Bump it whenever the registrations change: a prebuilt
# minitron._C from other sources (e.g. one that still defined the op schema itself) would abort the
# process when loaded, so the loader reads this tag from the binary first and skips a mismatch.
EXT_ABI = 3  # 3: kd_forward_kl_chunk_ (csrc/kd_cpu.cpp)
EXT_ABI_TAG = f"minitron-ext-abi={EXT_ABI};"  # the string gather_cpu.cpp embeds
CXX_FLAGS = ("-O3", f"-DMINITRON_EXT_ABI={EXT_ABI}")  # the C++ standard is chosen by torch.utils.cpp_extension
NVCC_FLAGS = ("-O3",)
PACKAGED_CSRC = "_csrc"  # csrc/ inside the installed minitron package

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # minitron/


def csrc_dir() -> Path | None:
    """The directory holding the C++/CUDA sources: ``minitron/_csrc`` when installed, else the repo's ``csrc/``."""
    for d in (_PACKAGE_DIR / PACKAGED_CSRC, _PACKAGE_DIR.parent / "csrc"):
        if all((d / s).is_file() for s in CPU_SOURCES + HEADERS):
            return d
    return None


def abi_matches(binary: str | Path) -> bool:
    """Whether a built extension embeds this :data:`EXT_ABI` (read from the file, without loading it)."""
    try:
        return EXT_ABI_TAG.encode() in Path(binary).read_bytes()
    except OSError:
        return False


def sources(with_cuda: bool) -> list[str]:
    """Source file names (relative to :func:`csrc_dir`) of a CPU-only or a CPU + CUDA build."""
    return list(CPU_SOURCES + (CUDA_SOURCES if with_cuda else ()))


def cxx_flags(with_cuda: bool) -> list[str]:
    return list(CXX_FLAGS) + ([f"-D{CUDA_DEFINE}"] if with_cuda else [])


def nvcc_flags() -> list[str]:
    return list(NVCC_FLAGS) + [f"-D{CUDA_DEFINE}"]
