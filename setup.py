"""Build script: the Python package, the Triton kernels (as fastpref.kernels) and the csrc/ extensions.

Extensions (both optional; the package installs without them and backend="native" then says why):
- fastpref._native_cpu  (csrc/cpu): whenever torch's C++ extension tooling and a C++ compiler are present.
- fastpref._native_cuda (csrc/cuda): when torch is a CUDA build and nvcc is found. CUDA_HOME is set to the
  toolkit root explicitly (nvcc on PATH may be a wrapper script), the `nvidia` pip package's include folder
  (cuBLAS headers that ATen/cuda includes) is added, TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX".
Compiler flags and the default arch list live in csrc/build_flags.py, which csrc/check_cuda_compile.py uses too.
An extension that fails to compile prints a warning; the reasons land in fastpref/_native_build.json,
which the loader quotes. FASTPREF_NO_NATIVE=1 skips both, FASTPREF_NO_CUDA=1 skips the CUDA one.
"""
import json
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "csrc"))
from build_flags import CPU_FLAGS, CUDA_ARCH_LIST, CUDA_CXX_FLAGS, NVCC_FLAGS  # noqa: E402  (one definition)

NOTES_FILE = os.path.join(HERE, "fastpref", "_native_build.json")
notes = {}  # module name -> why it was not built


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else where nvcc on PATH really lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"(/\S+)/bin/nvcc", head)
            if m:
                return m.group(1).decode()
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(nvcc))


def nvidia_include_dirs():
    """Include folders of the `nvidia` pip packages (cuBLAS headers for ATen/cuda/CUDAContext.h)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        for sub in ("cu13/include", "cu12/include", "cublas/include", "cuda_runtime/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                dirs.append(path)
    return dirs


def native_extensions():
    if os.environ.get("FASTPREF_NO_NATIVE") == "1":
        notes["_native_cpu"] = notes["_native_cuda"] = "skipped (FASTPREF_NO_NATIVE=1)"
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        notes["_native_cpu"] = notes["_native_cuda"] = f"torch's extension tooling is missing ({err})"
        return [], {}

    class SafeBuildExt(BuildExtension):
        """Builds each extension on its own; a failure becomes a warning and a note for the loader."""

        def build_extension(self, ext):
            name = ext.name.rsplit(".", 1)[-1]
            try:
                super().build_extension(ext)
                notes.pop(name, None)
            except Exception as err:  # noqa: BLE001 - any compiler/linker failure
                why = f"{type(err).__name__}: {err}".strip()
                notes[name] = f"compiling it failed ({why[:500]})"
                print(f"WARNING: fastpref.{name} was not built: {why}", file=sys.stderr)

        def run(self):
            try:
                super().run()
            finally:
                write_notes()

    exts = []
    cpu_src = [f"csrc/cpu/{f}" for f in ("native_cpu.cpp", "rowmath.cpp")]
    exts.append(CppExtension("fastpref._native_cpu", cpu_src,
                             extra_compile_args={"cxx": CPU_FLAGS}, extra_link_args=["-fopenmp"]))
    notes["_native_cpu"] = "the build did not run"
    if os.environ.get("FASTPREF_NO_CUDA") == "1":
        notes["_native_cuda"] = "skipped (FASTPREF_NO_CUDA=1)"
    elif torch.version.cuda is None:
        notes["_native_cuda"] = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        notes["_native_cuda"] = "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
        cuda_src = ["csrc/cuda/native_cuda.cpp"] + sorted(
            f"csrc/cuda/{f}" for f in os.listdir(os.path.join(HERE, "csrc", "cuda")) if f.endswith(".cu"))
        exts.append(CUDAExtension(
            "fastpref._native_cuda", cuda_src, include_dirs=nvidia_include_dirs(),
            extra_compile_args={"cxx": list(CUDA_CXX_FLAGS), "nvcc": list(NVCC_FLAGS)}))
        notes["_native_cuda"] = "the build did not run"
    return exts, {"build_ext": SafeBuildExt}


def write_notes():
    try:
        if notes:
            with open(NOTES_FILE, "w") as f:
                json.dump(notes, f, indent=1)
        elif os.path.exists(NOTES_FILE):
            os.remove(NOTES_FILE)
    except OSError:
        pass


ext_modules, cmdclass = native_extensions()


def requirements(name: str) -> list[str]:
    """The packages of requirements-<name>.txt (comments and ``-r`` includes resolved), for the extras."""
    out = []
    with open(os.path.join(HERE, f"requirements-{name}.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                out += requirements(line[3:].strip()[len("requirements-"):-len(".txt")])
            elif line:
                out.append(line)
    return out


# pip install "fastpref[train]" (the trainer), [trl] (the TRL drop-ins), [bench] (the benchmarks),
# [test] (the test suite and its benchmark plugin; includes train and trl), [dev] (everything).
# Lower bounds are the versions CI tests (constraints.txt; the GPU check runs torch 2.11 and triton 3.6).
EXTRAS = {"train": requirements("train"),
          "trl": ["trl>=1.16", "transformers>=5.25", "peft>=0.21", "accelerate>=1.16", "datasets>=5.2"],
          "triton": ["triton>=3.6"], "bench": requirements("bench"), "test": requirements("dev")}
EXTRAS["dev"] = sorted(set().union(*EXTRAS.values()))

setup(
    name="fastpref",
    version=re.search(r'__version__ = "([^"]+)"', open(os.path.join(HERE, "fastpref", "__init__.py")).read())[1],
    description="Preference-alignment losses from hidden states, without materializing logits",
    python_requires=">=3.10",
    packages=find_packages(include=["fastpref", "fastpref.*"]) + ["fastpref.kernels"],
    package_dir={"fastpref": "fastpref", "fastpref.kernels": "kernels"},
    package_data={"fastpref.train": ["assets/*.json"]},
    entry_points={"console_scripts": ["fastpref=fastpref.cli:main"]},
    install_requires=["torch>=2.11", "numpy"],
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
