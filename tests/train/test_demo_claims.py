"""The README's demo sentences are facts: they are generated from bench/results/demos/demos.json (the bands over
seeds and backends that ``python -m bench.demos run`` measured), and a demo run is held to those bands. CI runs
the README's three demo commands on its fresh clone and checks them with ``python -m bench.demos check``; with
FASTPREF_TEST_DEMO=1 this file runs the offline demo itself."""
import json
import os

import pytest

from bench.demos import check, demo_of, main, numbers, outside


def test_readme_demo_text_is_generated_from_the_results():
    assert main(["readme", "--check"]) == 0, "README.md's demo text is stale: python -m bench.demos readme"


def test_check_names_a_number_outside_its_band(tmp_path, capsys):
    summary = {"eval_greedy_before": {"exact_match": 0.1, "digit_accuracy": 0.2},
               "eval_greedy_after": {"exact_match": 0.3, "digit_accuracy": 0.95}}
    assert demo_of(summary) == "offline"
    band = {"exact_before": [0.0, 0.2], "exact_after": [0.9, 1.0], "digit_before": [0.1, 0.3],
            "digit_after": [0.9, 1.0], "exact_gain": [0.7, 1.0], "digit_gain": [0.6, 0.9]}
    problems = outside("offline", numbers("offline", summary), band)
    assert [p.split(" ")[0] for p in problems] == ["exact_after", "exact_gain"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert check([str(tmp_path)]) == 1 and "exact_after = 0.300" in capsys.readouterr().out


@pytest.mark.skipif(os.environ.get("FASTPREF_TEST_DEMO") != "1", reason="set FASTPREF_TEST_DEMO=1 (minutes)")
def test_offline_demo_lands_in_its_band(tmp_path):
    from fastpref.train import main as train

    train(["--output-dir", str(tmp_path), "--no-progress", "--no-plots"])
    assert check([str(tmp_path)]) == 0
