"""The losses table of docs/losses.md, generated from the registry: ``python -m fastpref.losses.table`` prints
it, ``python -m fastpref.losses.table --write`` replaces the text between the file's losses markers."""
from __future__ import annotations

import inspect
import re

from .registry import get, names

FAMILIES = {
    "pairwise": "pairwise, with reference", "variants": "pairwise variants", "reference_free": "reference-free",
    "unpaired": "unpaired", "token_level": "token-level", "listwise": "listwise (K per prompt)",
    "reward": "reward model", "kl_estimators": "token-KL estimator", "rl": "on-policy RL (token-level)",
}


def _summary(fn) -> str:
    first = inspect.getdoc(fn).split("\n\n")[0]
    text = re.sub(r"\s+", " ", first).replace("``", "`").replace("|", "\\|")
    return text if len(text) <= 220 else text[:217].rstrip() + "…"


def _inputs(fn) -> str:
    params = inspect.signature(fn).parameters.values()
    tensors = [p.name for p in params if "Tensor" in str(p.annotation)]
    hyper = [f"{p.name}={p.default!r}" for p in params
             if "Tensor" not in str(p.annotation) and p.default is not inspect.Parameter.empty]
    return ", ".join(f"`{t}`" for t in tensors) + (f"; {', '.join(hyper)}" if hyper else "")


def markdown() -> str:
    rows = ["| name | family | loss (see its docstring) | inputs; hyper-parameters with defaults |", "|---|---|---|---|"]
    for name in names():
        fn = get(name)
        family = FAMILIES.get(fn.__module__.rsplit(".", 1)[-1], "")
        rows.append(f"| `{name}` | {family} | {_summary(fn)} | {_inputs(fn)} |")
    return "\n".join(rows)


DOC = "docs/losses.md"
BEGIN, END = "<!-- losses:begin -->\n", "\n<!-- losses:end -->"


def write(path: str = DOC) -> None:
    """Replace the table between the markers of ``path`` (docs/losses.md, run from the repository root)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + BEGIN + markdown() + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    import sys

    write() if "--write" in sys.argv[1:] else print(markdown())
