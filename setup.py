"""Builds ghost_ext._C: the C++ CPU kernels always, the CUDA kernels whenever nvcc and a CUDA build
of torch are present (a GPU is not needed to compile them).

    pip install --no-build-isolation -e .            # or: python setup.py build_ext --inplace

Environment: GHOST_EXT=0 builds no kernels (the plain-PyTorch fallback only); GHOST_EXT_CUDA=1 forces
the CUDA kernels (error if they cannot be built), =0 skips them; TORCH_CUDA_ARCH_LIST defaults to
"8.0;9.0"; MAX_JOBS limits ninja's parallel jobs.
"""
import os
from pathlib import Path

# torch guesses CUDA_HOME from `which nvcc` or /usr/local; point it at the toolkit before
# torch.utils.cpp_extension reads it at import time.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).resolve().parent
CSRC = Path("ghost_ext") / "csrc"


def want_cuda() -> bool:
    flag = os.environ.get("GHOST_EXT_CUDA", "").strip()
    if flag == "0":
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    if flag == "1" and not have:
        raise SystemExit("setup.py: GHOST_EXT_CUDA=1 but nvcc or a CUDA build of torch is missing; "
                         "set CUDA_HOME to the toolkit or unset GHOST_EXT_CUDA")
    return have


def extension():
    cxx = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for is inline and needs it to run threads
    sources = [str(CSRC / "ghost.cpp")]
    if want_cuda():
        print(f"setup.py: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        sources += [str(CSRC / "cuda" / "ghost_cuda_host.cpp"), str(CSRC / "cuda" / "ghost_cuda.cu")]
        return CUDAExtension("ghost_ext._C", sources,
                             extra_compile_args={"cxx": cxx + ["-DGHOST_WITH_CUDA"], "nvcc": ["-O3"]},
                             extra_link_args=["-fopenmp"])
    print("setup.py: building CPU kernels only (no nvcc / CUDA torch, or GHOST_EXT_CUDA=0)")
    return CppExtension("ghost_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


# The folders the scripts read that are no Python module: a plain `pip install .` copies them to
# <data root>/share/ghostcars/, where common.project_dir finds them (a checkout or -e install reads them in place).
# web/node_modules is not copied: `npm install` in that folder fetches onnxruntime-web, as webapp.py says.
DATA_FILES = [(f"share/ghostcars/{d}", sorted(str(p.relative_to(ROOT)) for p in (ROOT / d).glob(pattern)))
              for d, pattern in (("recipes", "*.yaml"), ("web", "*.*"))]

# every top-level module the scripts import (a test checks this list against the repository's *.py files)
PY_MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "setup")

setup(
    name="ghostcars",
    version="0.1.0",
    description="GhostNet car-model classifier with a fused C++/CUDA ghost op",
    python_requires=">=3.10",
    py_modules=PY_MODULES,
    packages=["ghost_ext"],
    data_files=DATA_FILES,
    # GHOST_EXT=0: no compiled kernels at all (no compiler needed; ghost_ext then runs its plain-PyTorch fallback)
    ext_modules=[] if os.environ.get("GHOST_EXT", "").strip() == "0" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "torchvision", "numpy", "scipy", "tqdm"],
    extras_require={"plot": ["matplotlib"], "timm": ["timm"], "export": ["onnx", "onnxscript", "onnxruntime"]},
)
