"""megapeer: PEER + MLA pretraining on Megatron-Core.

The CUDA extension `megapeer._C` (csrc/peer) is built when a CUDA build of torch
and nvcc are present. Environment switches:
  MEGAPEER_BUILD_EXT=0|1|auto   skip, force, or build when possible (default auto)
  MEGAPEER_CUDA_ARCHS="90a"     semicolon-separated targets (default 90a)
Install with `pip install --no-build-isolation -e .` so the build sees your torch.
"""
import glob
import os

from setuptools import find_packages, setup


def _cutlass_include():
    try:
        import cutlass_library
    except ImportError:
        return []
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return [inc] if os.path.isdir(inc) else []


def cuda_extensions():
    mode = os.environ.get("MEGAPEER_BUILD_EXT", "auto").lower()
    if mode in ("0", "no", "false", "skip"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode in ("1", "force"):
            raise RuntimeError("MEGAPEER_BUILD_EXT=1 but torch is not importable")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if mode in ("1", "force"):
            raise RuntimeError("MEGAPEER_BUILD_EXT=1 needs a CUDA build of torch and nvcc")
        print("megapeer: CPU torch or no nvcc: skipping the CUDA extension")
        return [], {}
    sources = sorted(glob.glob("csrc/peer/*.cpp") + glob.glob("csrc/peer/*.cu"))
    if not sources:
        return [], {}
    archs = os.environ.get("MEGAPEER_CUDA_ARCHS", "90a").split(";")
    gencode = []
    for a in archs:
        gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    ext = CUDAExtension(
        name="megapeer._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")] + _cutlass_include(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_HALF_CONVERSIONS__"] + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="megapeer",
    version="0.1.0",
    description="PEER + MLA language-model pretraining on Megatron-Core",
    packages=find_packages(include=["megapeer", "megapeer.*"]),
    package_data={"megapeer": ["convert/hf_modeling/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "wandb",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "nvidia-cutlass==4.2.0.0"],
        "data": ["pyarrow"],
        "hf": ["transformers>=4.51", "safetensors", "tokenizers"],
        "eval": ["lm-eval==0.4.13"],
        "tb": ["tensorboard"],
        "kernels": ["nvidia-cutlass==4.2.0.0"],
    },
    entry_points={"console_scripts": ["megapeer=megapeer.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
