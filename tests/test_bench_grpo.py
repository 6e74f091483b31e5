"""bench.grpo's three paths (fastpref, TRL's chunked head + _compute_loss, naive logits) compute the same GRPO loss
and gradients on a toy shape, and the CLI rejects bad arguments with a message (the timing run is not a test)."""
import pytest
import torch

pytest.importorskip("trl")

from bench import grpo  # noqa: E402


def test_paths_agree_on_a_toy_shape():
    inputs = grpo._inputs(2, 24, 97, 16, seed=3)
    out = {p: grpo._step(p, *inputs) for p in grpo.PATHS}
    loss, gh, gw = out["naive"]
    assert gh.abs().sum() > 0
    for p in ("fastpref", "trl"):
        assert out[p][0] == pytest.approx(loss, rel=1e-4, abs=1e-6), p
        torch.testing.assert_close(out[p][1], gh, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out[p][2], gw, rtol=1e-4, atol=1e-6)


def test_cli_rejects_unknown_path(capsys):
    assert grpo.main(["--paths", "fastpref,vllm"]) == 2
    assert "paths must come from" in capsys.readouterr().err
