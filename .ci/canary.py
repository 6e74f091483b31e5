"""Drift canary: does fastpref still install and work with the NEWEST release of every dependency?

`make test` runs against constraints.txt (the lock). This script builds a second environment from nothing with
no constraints (torch excepted: the newest torch on the package index is a CUDA build of several GB, so the
canary keeps the lock's CPU torch), installs fastpref from the repository root, and runs a fast subset:

  install  pip install --no-build-isolation -e . from the repository root
  import   fastpref, its trainer and integrations; `import kernels` is Hugging Face's package, not our folder
  demo     python -m fastpref.train with few steps, then from_pretrained on the saved model
  tests    the TRL drop-in parity tests and the Hugging Face family tests

A failing check is blamed on one package: each package whose version differs from the lock (those the
failure's output names first) is put back to its locked version alone and the check rerun; the first one
that makes it pass is named. The last line printed is the verdict, e.g.
  drift canary: FAILED: transformers 5.26.0 (locked 5.25.0) breaks 'demo': ValueError: ...

  python3 .ci/canary.py [--venv DIR] [--find-links DIR] [--checks install,import,demo,tests] [--self-test]

--self-test then plants a deliberately broken release (tqdm 999.0) in a temporary package folder, upgrades to
it as a new release would arrive, and requires the verdict to name it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "constraints.txt")
CHECKS = ("install", "import", "demo", "tests")
TEST_FILES = ["tests/integrations/test_trl_dpo.py", "tests/integrations/test_trl_kto.py",
              "tests/integrations/test_trl_reward.py", "tests/integrations/test_trl_grpo.py",
              "tests/integrations/test_transformers.py"]
IMPORT_CODE = """
import importlib.metadata, os, kernels, fastpref, fastpref.nn, fastpref.train, fastpref.integrations.trl
import transformers
origin = os.path.realpath(kernels.__file__)
assert not origin.startswith(os.path.realpath('kernels')), f"import kernels found the repository folder: {origin}"
print('kernels', importlib.metadata.version('kernels'), 'at', origin)
"""
LOAD_CODE = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
print(type(model).__name__, sum(p.numel() for p in model.parameters()), 'parameters; vocabulary', len(tok))
"""


def norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lines: list[str]) -> dict[str, str]:
    """`name==version` lines (pip freeze or the lock) -> {normalised name: version}."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name)] = version.strip()
    return pins


class Canary:
    def __init__(self, venv: str, find_links: str | None, log: str):
        self.venv, self.find_links, self.log = venv, find_links, log
        self.py = os.path.join(venv, "bin", "python")
        with open(LOCK) as f:
            self.locked = read_pins(f.readlines())
        self.scratch = tempfile.mkdtemp(prefix="fastpref-canary-")

    def run(self, args: list[str], env: dict | None = None, timeout: int = 900) -> tuple[bool, str]:
        """Runs a command from the repository root; (succeeded, its output), the output appended to the log."""
        full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        try:
            p = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
            ok, out = p.returncode == 0, p.stdout + p.stderr
        except subprocess.TimeoutExpired as err:
            ok, out = False, f"timed out after {timeout} s: {err}"
        with open(self.log, "a") as f:
            f.write(f"$ {' '.join(args)}\n{out}\n")
        return ok, out

    def pip(self, *args: str) -> tuple[bool, str]:
        extra = ["--find-links", self.find_links] if self.find_links else []
        return self.run([self.py, "-m", "pip", "install", "-q", *extra, *args])

    def create(self) -> None:
        """A fresh venv: the lock's torch, then the newest of everything the trainer and the tests use."""
        shutil.rmtree(self.venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", self.venv], check=True)
        for step in (["-U", "pip", "setuptools", "wheel", f"torch=={self.locked['torch']}"],
                     ["-U", "--upgrade-strategy", "eager", "-r", "requirements-dev.txt",
                      f"torch=={self.locked['torch']}"]):
            ok, out = self.pip(*step)
            if not ok:
                sys.exit(f"drift canary: FAILED: installing the newest packages failed: {last_error(out)}")

    def check(self, name: str) -> tuple[bool, str]:
        if name == "install":
            return self.run([self.py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                            env={"FASTPREF_NO_NATIVE": "1"})
        if name == "import":
            return self.run([self.py, "-c", IMPORT_CODE])
        if name == "demo":
            out_dir = os.path.join(self.scratch, "demo")
            ok, out = self.run([self.py, "-m", "fastpref.train", "--output-dir", out_dir, "--overwrite",
                                "--sft-steps", "40", "--steps", "10", "--synthetic-eval", "16", "--no-plots",
                                "--no-progress", "--backend", "torch"])
            if not ok:
                return ok, out
            return self.run([self.py, "-c", LOAD_CODE, os.path.join(out_dir, "final")])
        if name == "tests":
            return self.run([self.py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TEST_FILES],
                            env={"FASTPREF_TEST_TRL": "1"})
        raise ValueError(name)

    def drift(self) -> dict[str, tuple[str, str]]:
        """{package: (locked version, installed version)} for every package that moved since the lock."""
        ok, out = self.run([self.py, "-m", "pip", "freeze", "--all", "--exclude-editable"])
        now = read_pins(out.splitlines())
        return {k: (self.locked[k], v) for k, v in sorted(now.items()) if k in self.locked and self.locked[k] != v}

    def suspects(self, moved: dict[str, tuple[str, str]], output: str) -> list[str]:
        """Moved packages, those whose modules the failure's output mentions first."""
        code = ("import importlib.metadata as m, json; print(json.dumps({k: v for k, v in "
                "m.packages_distributions().items()}))")
        ok, out = self.run([self.py, "-c", code])
        modules = __import__("json").loads(out.strip().splitlines()[-1]) if ok else {}
        named = []
        for module, dists in modules.items():
            if re.search(rf"(site-packages/{re.escape(module)}/|\b{re.escape(module)}\b)", output):
                named += [norm(d) for d in dists if norm(d) in moved]
        named = list(dict.fromkeys(named))
        return named + [k for k in moved if k not in named]

    def blame(self, name: str, output: str, limit: int = 8) -> str:
        """One line naming the package whose new release breaks check `name` (or saying none alone does)."""
        moved = self.drift()
        error = last_error(output)
        if not moved:
            return f"drift canary: FAILED: '{name}' fails with the locked versions too (not a drift): {error}"
        for pkg in self.suspects(moved, output)[:limit]:
            locked, new = moved[pkg]
            self.pip("--no-deps", f"{pkg}=={locked}")
            fixed = self.check(name)[0]
            self.pip("--no-deps", f"{pkg}=={new}")
            if fixed:
                return f"drift canary: FAILED: {pkg} {new} (locked {locked}) breaks '{name}': {error}"
        listed = ", ".join(f"{k} {v[0]}->{v[1]}" for k, v in moved.items())
        return f"drift canary: FAILED: '{name}' fails and no single package's locked version fixes it " \
               f"(moved since the lock: {listed}): {error}"

    def run_checks(self, names: list[str]) -> str | None:
        """Runs the checks in order; None when all pass, else the verdict line of the first failure."""
        for name in names:
            t0 = time.time()
            ok, out = self.check(name)
            print(f"drift canary: {name}: {'ok' if ok else 'FAILED'} ({time.time() - t0:.0f} s)", flush=True)
            if not ok:
                print("\n".join(out.strip().splitlines()[-15:]))
                return self.blame(name, out)
        return None


def last_error(output: str) -> str:
    """The most telling line of a failure's output (the last exception or error line)."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^(E\s+)?[\w.]*(Error|Exception|Exit)\b|^error:|^ERROR|FAILED", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def broken_release(folder: str, name: str = "tqdm", version: str = "999.0") -> None:
    """Writes a wheel of `name` `version` whose import fails, as a bad upstream release would."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"raise ImportError('{name} {version} is broken on purpose')\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: canary\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{dist}/top_level.txt": f"{name}\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(os.path.join(folder, f"{name}-{version}-py3-none-any.whl"), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def self_test(canary: Canary) -> bool:
    """A broken release appears in a package folder; the canary must fail naming it."""
    index = tempfile.mkdtemp(prefix="fastpref-canary-index-")
    broken_release(index)
    canary.find_links = index
    canary.pip("-U", "--no-deps", "tqdm")
    verdict = canary.run_checks(["import"])
    print(f"drift canary self-test: the planted release gave: {verdict}")
    canary.find_links = None
    canary.pip("--no-deps", "--force-reinstall", f"tqdm=={canary.locked['tqdm']}")  # leave the venv usable
    good = verdict is not None and "tqdm 999.0 (locked" in verdict
    print(f"drift canary self-test: {'ok' if good else 'FAILED'}: a broken tqdm 999.0 "
          f"{'was' if good else 'was NOT'} named")
    return good


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=os.path.join(ROOT, ".venv-canary"))
    ap.add_argument("--find-links", default=None, help="an extra folder of packages (newer releases to try)")
    ap.add_argument("--checks", default=",".join(CHECKS))
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep an existing --venv instead of building it anew")
    args = ap.parse_args()
    names = [c for c in args.checks.split(",") if c]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {unknown}; expected some of {','.join(CHECKS)}")
    log = os.path.join(tempfile.gettempdir(), "fastpref-canary.log")
    open(log, "w").close()
    canary = Canary(args.venv, args.find_links, log)
    t0 = time.time()
    if not (args.reuse and os.path.exists(canary.py)):
        canary.create()
    moved = canary.drift()
    print(f"drift canary: {len(moved)} package(s) newer than the lock: "
          + (", ".join(f"{k} {v[0]}->{v[1]}" for k, v in moved.items()) or "none"), flush=True)
    verdict = canary.run_checks(names)
    if verdict is None and args.self_test and "install" in names:
        verdict = None if self_test(canary) else "drift canary: FAILED: the self-test did not name the broken package"
    print(f"drift canary: full log in {log} ({time.time() - t0:.0f} s)")
    print(verdict or "drift canary: ok: fastpref works with the newest release of every dependency")
    return 0 if verdict is None else 1


if __name__ == "__main__":
    sys.exit(main())
