"""The README and docs/*.md as written: every ```python block runs, every ```python fragment block compiles,
every shell command names real make targets, pip extras and `fastpref train` flags, every relative link
resolves, no paragraph of the README is repeated, and the generated losses table is current."""
import ast
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", flags=re.S | re.M)


def blocks(info: str) -> list[tuple[str, str]]:
    """(name, code) of every fenced block whose info string is ``info``."""
    out = []
    for page in PAGES:
        found = [code for i, code in FENCE.findall(page.read_text()) if i.strip() == info]
        out += [(f"{page.relative_to(ROOT)}[{info} block {n}]", code) for n, code in enumerate(found)]
    return out


@pytest.mark.parametrize("name,code", blocks("python"), ids=lambda x: x if x.endswith("]") else "")
def test_python_blocks_run(name, code):
    exec(compile(code, name, "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("name,code", blocks("python fragment"), ids=lambda x: x if x.endswith("]") else "")
def test_python_fragments_compile(name, code):
    compile(code, name, "exec")


def test_python_blocks_are_marked_runnable_or_fragment():
    """A Python block is either run (```python) or explicitly a fragment (```python fragment), never ```py."""
    for page in PAGES:
        for info, _ in FENCE.findall(page.read_text()):
            if info.strip().lower().startswith("py"):
                assert info.strip() in ("python", "python fragment"), f"{page.name}: code block marked {info!r}"


def _extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXTRAS":
            keys = {k.value for k in node.value.keys}
    for node in ast.walk(tree):  # EXTRAS["dev"] = ...
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript) \
                and getattr(node.targets[0].value, "id", None) == "EXTRAS":
            keys.add(node.targets[0].slice.value)
    return keys


def test_shell_commands_name_real_targets_extras_and_flags():
    from fastpref.train.config import _join_negative_numbers, parser
    from fastpref.train.online.config import parser as online_parser

    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    extras, checked = _extras(), 0
    for name, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["make"]:
                assert all(w in targets for w in words[1:] if "=" not in w), (name, line)
            elif words[:1] == ["pip"]:
                for extra in re.findall(r"\[([\w,]+)\]", line):
                    assert set(extra.split(",")) <= extras, (name, line)
            elif words[:2] == ["fastpref", "train"] or words[:3] == ["python", "-m", "fastpref.train"]:
                argv = words[2:] if words[0] == "fastpref" else words[3:]
                if "--help" in argv or "-h" in argv:
                    continue
                if "--online" in argv:  # the online mode's own flags
                    online_parser().parse_args(argv)
                else:
                    parser().parse_args(_join_negative_numbers(argv))  # a user error would raise here
            else:
                continue
            checked += 1
    assert checked >= 4


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_has_no_repeated_paragraph():
    text = README.read_text().split("<!-- perf:begin -->")[0]  # the generated performance section aside
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", FENCE.sub("", text)) if len(p.strip()) > 80]
    assert len(paragraphs) == len(set(paragraphs))


def test_losses_table_is_current():
    from fastpref.losses.table import BEGIN, DOC, END, markdown

    text = (ROOT / DOC).read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == markdown(), "docs/losses.md is stale: regenerate with python -m fastpref.losses.table --write"
