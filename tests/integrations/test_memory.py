"""Peak host memory: the fused HF path stays well below the naive logits path (bench/hf_memory.py, subprocesses)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import hf_memory  # noqa: E402


def test_fused_peak_memory_below_naive():
    shape = dict(batch=1, seq=1024, vocab=32000, hidden=32)  # logits: 125 MiB; the naive path holds several
    # each path in its own interpreter, so that neither's peak hides the other's
    fused = hf_memory.measure("fused", **shape, timeout=300)
    naive = hf_memory.measure("naive", **shape, timeout=300)
    logits = naive["logits_mib"]
    assert naive["peak_growth_mib"] > logits, naive  # the measurement sees at least one [N, V] float32 tensor
    assert fused["peak_growth_mib"] < 0.5 * logits, fused
    assert fused["peak_growth_mib"] < naive["peak_growth_mib"] / 3, (naive, fused)
