"""The package's submodules are reachable after ``import fastpref``, without importing optional libraries."""
import json
import os
import subprocess
import sys
from pathlib import Path

import fastpref

CODE = """
import json, sys
import fastpref
eager = sorted(m for m in ("transformers", "trl", "datasets", "peft", "deepspeed") if m in sys.modules)
names = fastpref.losses.names()
reached = [type(getattr(fastpref, m)).__name__ for m in ("losses", "nn", "parallel", "integrations")]
after = sorted(m for m in ("transformers", "trl") if m in sys.modules)
print(json.dumps(dict(eager=eager, n=len(names), sigmoid="sigmoid" in names, reached=reached, after=after,
                      dir=[m for m in ("losses", "nn", "parallel", "integrations") if m in dir(fastpref)])))
"""


def test_submodules_reachable_and_lazy():
    root = str(Path(fastpref.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["eager"] == [], f"`import fastpref` imported optional libraries {r['eager']}"
    assert r["n"] > 50 and r["sigmoid"]
    assert r["reached"] == ["module"] * 4
    assert r["after"] == [], f"reaching fastpref.integrations imported {r['after']}"
    assert len(r["dir"]) == 4


def test_unknown_attribute_is_an_attribute_error():
    try:
        fastpref.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")
