"""Peak host memory: the fused HF path stays well below the naive logits path (bench/hf_memory.py, subprocesses)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import hf_memory  # noqa: E402


def test_fused_peak_memory_below_naive():
    shape = dict(batch=1, seq=512, vocab=32000, hidden=32)  # logits: 62.5 MiB; the naive path holds several
    # one subprocess, fused first: naive's growth of the process peak is then measured above fused's peak
    fused, naive = hf_memory.measure(["fused", "naive"], **shape, timeout=300)
    logits = naive["logits_mib"]
    assert naive["peak_growth_mib"] > 1.5 * logits, naive
    assert fused["peak_growth_mib"] < 0.5 * logits, fused
    assert fused["peak_growth_mib"] < naive["peak_growth_mib"] / 3, (naive, fused)
