"""The README's demo sentence is a fact: the offline demo, as `make train` runs it, lands inside the bands that
``python -m bench.demos run`` recorded over seeds and backends (bench/results/demos/demos.json). The online and
reward demos are held to theirs in test_online_run.py / test_reward_task.py."""
import json
import os
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "demos" / "demos.json"
SLACK = 0.02  # the band is over 3 seeds x 2 backends; another machine may round differently


def band(demo: str) -> dict:
    return json.loads(RESULTS.read_text())["bands"][demo]


def inside(value: float, lo_hi: list[float]) -> bool:
    return lo_hi[0] - SLACK <= value <= lo_hi[1] + SLACK


def test_readme_demo_text_is_generated_from_the_results():
    from bench.demos import main

    assert main(["readme", "--check"]) == 0, "README.md's demo text is stale: python -m bench.demos readme"


@pytest.mark.skipif(os.environ.get("FASTPREF_TEST_DEMO") != "1", reason="set FASTPREF_TEST_DEMO=1 (minutes)")
def test_offline_demo_lands_in_its_band(tmp_path):
    from bench.demos import numbers
    from fastpref.train import main

    s = main(["--output-dir", str(tmp_path), "--no-progress", "--no-plots"])
    got, b = numbers("offline", s), band("offline")
    print(json.dumps(got))
    for key, value in got.items():
        assert inside(value, b[key]), f"{key} = {value:.3f} outside the recorded band {b[key]}"
    for stem in ("exact", "digit"):
        assert inside(got[f"{stem}_after"] - got[f"{stem}_before"], b[f"{stem}_gain"]), (stem, got, b)
