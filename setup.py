"""Builds performer._C: the CPU kernels always; the CUDA kernels (csrc/cuda/*.cu) when the
installed torch has CUDA and nvcc is found, unless PERFORMER_BUILD_CUDA=0 (a CPU-only build
beside a CUDA torch; with no GPU to detect, set TORCH_CUDA_ARCH_LIST to build the CUDA kernels). Build with `pip install --no-build-isolation .` so
that the extension compiles against the torch already installed."""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(
        name="performer._C",
        sources=sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    cuda_sources = sources("csrc/cuda/*.cu")
    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    wanted = os.environ.get("PERFORMER_BUILD_CUDA", "1") != "0"
    if wanted and torch_has_cuda() and has_nvcc and cuda_sources:
        print("performer: building CUDA kernels for TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected)')}")
        return cpp_extension.CUDAExtension(
            sources=kwargs.pop("sources") + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}, **kwargs)
    reason = ("PERFORMER_BUILD_CUDA=0" if not wanted else "no CUDA sources" if not cuda_sources else
              "the installed torch has no CUDA" if not torch_has_cuda() else "nvcc was not found")
    print(f"performer: building CPU kernels only ({reason})")
    return cpp_extension.CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


def torch_has_cuda():
    import torch
    return torch.version.cuda is not None


setup(
    name="performer",
    version="0.1.0",
    description="Fast efficient-transformer kernels for PyTorch: FAVOR+ attention and blocked matmul",
    packages=find_packages(include=["performer", "performer.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"bench": ["matplotlib", "pytest-benchmark"],  # python -m performer.bench plots; bench/
                    "hf": ["transformers>=5,<6"],    # performer.integrations.hf
                    "timm": ["timm>=1.0.20"]},       # performer.integrations.timm
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
