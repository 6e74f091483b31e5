"""The repository's kernels/ folder is ``fastpref.kernels`` only: from the repository root the top-level name
``kernels`` belongs to Hugging Face's kernel-hub package (which transformers imports), or to nothing."""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastpref

ROOT = Path(fastpref.__file__).resolve().parents[1]
REPORT = """
import json, os, sys
try:
    import kernels
    found = {"file": os.path.realpath(getattr(kernels, "__file__", None) or ""),
             "fake": getattr(kernels, "FAKE", False), "internals": hasattr(kernels, "get_kernel")}
except ModuleNotFoundError as err:
    found = {"missing": str(err), "left": "kernels" in sys.modules}
import fastpref.kernels.presets
found["ours"] = os.path.realpath(fastpref.kernels.__file__)
print(json.dumps(found))
"""


def run_in_root(code: str, extra_path: str | None = None) -> dict:
    """Runs `code` with the repository root as the current folder (first on sys.path, as `python -c` has it)."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_kernels_package_is_the_real_one_from_the_repository_root():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers >= 5.25 requires it)")
    found = run_in_root(REPORT)
    assert "site-packages" in found["file"], found
    assert found["internals"], "import kernels did not give the kernel-hub client (no get_kernel)"
    assert found["ours"] == str(ROOT / "kernels" / "__init__.py")
    # what transformers asks before loading hub kernels
    probe = run_in_root("import json; from transformers.utils import is_kernels_available as k; "
                        "import kernels, os; print(json.dumps({'ok': k(), 'file': kernels.__file__}))")
    assert probe["ok"] and "site-packages" in probe["file"]


def test_another_kernels_package_wins_over_the_folder(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("FAKE = True\n")
    found = run_in_root(REPORT, extra_path=str(tmp_path))
    assert found["fake"] is True and found["file"] == str(tmp_path / "kernels" / "__init__.py")
    assert found["ours"] == str(ROOT / "kernels" / "__init__.py")


def test_without_any_kernels_package_the_name_is_missing():
    # site-packages (where Hugging Face's package would be) removed from the search path before the import
    code = ("import sys; saved = sys.path[:]; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\n    r = {'file': kernels.__file__}\nexcept ModuleNotFoundError as e:\n"
            "    r = {'missing': str(e), 'left': 'kernels' in sys.modules}\n"
            "import json; print(json.dumps(r))")
    found = run_in_root(code)
    assert "missing" in found, f"import kernels found {found}"
    assert found["left"] is False
