"""Every python example in the README runs as written."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_losses_table_is_current():
    from fastpref.losses.table import markdown

    text = README.read_text()
    block = text.split("<!-- losses:begin -->\n", 1)[1].split("\n<!-- losses:end -->", 1)[0]
    assert block == markdown(), "README losses table is stale: regenerate with python -m fastpref.losses.table"
