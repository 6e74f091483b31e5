"""Compiler flags of the native extensions: the one definition that setup.py builds with and that
csrc/check_cuda_compile.py compiles the CUDA sources with (plain data, no imports: both load this file).

No fast-math flag for nvcc: ``--use_fast_math`` turns ``tanhf`` into ``tanh.approx.f32`` (relative error
about 1e-5), and softcapped logits then miss the float32 tolerance; it also flushes denormals and uses
approximate division and square roots.
"""

# -fno-trapping-math lets GCC if-convert (and so vectorize) the branch-free exp/tanh of csrc/cpu/rowmath.cpp;
# with it on, every row loop stays scalar (about 10x slower). torch itself is built with both flags.
# -g0: no debug info (2x faster build).
CPU_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]

# Host-compiler flags of the CUDA extension's .cpp files, and nvcc's flags for its .cu files.
CUDA_CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]

# TORCH_CUDA_ARCH_LIST unless the environment sets one: machine code for sm_80 (Ampere, Ada) and sm_90
# (Hopper), plus compute_90 PTX that the driver compiles for newer GPUs (sm_100, sm_120) on first use.
CUDA_ARCH_LIST = "8.0;9.0+PTX"

# nvcc options that relax float32 semantics (--use_fast_math implies the last four); none may be in NVCC_FLAGS.
FAST_MATH_FLAGS = ("--use_fast_math", "-use_fast_math", "--ftz=true", "-ftz=true", "--prec-div=false",
                   "-prec-div=false", "--prec-sqrt=false", "-prec-sqrt=false")


def sm_versions(arch_list: str = CUDA_ARCH_LIST) -> list[str]:
    """"8.0;9.0+PTX" → ["80", "90"]: the SM versions a TORCH_CUDA_ARCH_LIST builds machine code for."""
    return [a.split("+")[0].replace(".", "") for a in arch_list.replace(" ", ";").split(";") if a.strip()]
