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
    """The CUDA extension megapeer._C (csrc/peer), or nothing on CPU-only installs.

    MEGAPEER_BUILD_EXT=0 skips it, =1 fails loudly when it cannot be built, auto
    (default) builds it when torch is a CUDA build, nvcc is found and the CUTLASS/CuTe
    headers (pip install nvidia-cutlass) are importable. MEGAPEER_CUDA_ARCHS lists
    targets separated by ';' or ',' (default "90a": H100/H200, sm_90a).
    """
    mode = os.environ.get("MEGAPEER_BUILD_EXT", "auto").lower()
    if mode in ("0", "no", "false", "skip"):
        return [], {}
    force = mode in ("1", "yes", "true", "force")

    def skip(why):
        if force:
            raise RuntimeError(f"MEGAPEER_BUILD_EXT={mode} but {why}")
        print(f"megapeer: {why}: skipping the CUDA extension")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable")
    if torch.version.cuda is None or CUDA_HOME is None:
        return skip("torch is a CPU build or nvcc was not found")
    cutlass_inc = _cutlass_include()
    if not cutlass_inc:   # importing cutlass_library can fail on its own Python deps; find it instead
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
        inc = os.environ.get("MEGAPEER_CUTLASS_INCLUDE") or (
            os.path.join(list(spec.submodule_search_locations)[0], "source", "include") if spec else "")
        cutlass_inc = [inc] if inc and os.path.isdir(os.path.join(inc, "cute")) else []
    if not cutlass_inc:
        return skip("the CUTLASS/CuTe headers (pip install nvidia-cutlass) were not found")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(here, "csrc/peer/*.cpp")) + glob.glob(os.path.join(here, "csrc/peer/*.cu")))
    sources = [os.path.relpath(s, here) for s in sources]
    if not sources:
        return skip("csrc/peer has no sources")
    archs = [a.strip() for a in os.environ.get("MEGAPEER_CUDA_ARCHS", "90a").replace(",", ";").split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    archs_define = "-DMEGAPEER_CUDA_ARCHS_LIST=" + "_".join(archs)   # stringized in peer_binding.cpp
    ext = CUDAExtension(
        name="megapeer._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc"), os.path.join(here, "csrc/peer")] + cutlass_inc,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", archs_define],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_HALF_CONVERSIONS__", archs_define] + gencode,
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
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "nvidia-cutlass==4.2.0.0",
                "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "data": ["pyarrow"],
        "hf": ["transformers>=5", "safetensors", "tokenizers"],
        "eval": ["lm-eval==0.4.13"],
        "tb": ["tensorboard"],
        "kernels": ["nvidia-cutlass==4.2.0.0"],
    },
    entry_points={"console_scripts": ["megapeer=megapeer.cli:console_main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
