"""The API refuses what ``fastpref train`` refuses (the checks of ``fastpref.losses.registry``: one source),
knows the papers' loss names, and says what an empty or all-ignored batch gives (a zero loss that keeps the
graph, with a one-time warning)."""
import warnings

import pytest
import torch

from fastpref import nn as fnn
from fastpref.nn import PolicyLoss, PreferenceLoss


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta=-1.0), "beta=-1.0: expected a number > 0"),
    (dict(beta=float("nan")), "beta=nan: expected a number > 0 (finite in float32)"),
    (dict(beta=1e39), "beta=1e+39: expected a number > 0 (finite in float32)"),
    (dict(soft_labels=1.5), "soft_labels=1.5: expected a number in [0, 1]"),
    (dict(label_smoothing=0.7), "label_smoothing=0.7: expected a number in [0, 0.5]"),
])
def test_preference_loss_refuses_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError) as e:
        PreferenceLoss("sigmoid", **kwargs)
    assert str(e.value) == message


def test_negative_or_non_finite_weights_are_refused():
    for w in (-1.0, float("inf")):
        with pytest.raises(ValueError, match=f"loss sigmoid={w!r}: expected a finite weight > 0"):
            PreferenceLoss({"sigmoid": w})


def test_policy_loss_refuses_bad_hyper_parameters_but_takes_its_defaults():
    with pytest.raises(ValueError, match="epsilon=-0.2: expected a number >= 0"):
        PolicyLoss("grpo", epsilon=-0.2)
    with pytest.raises(ValueError, match="beta=nan"):
        PolicyLoss("grpo", beta=float("nan"))
    assert PolicyLoss("grpo", beta=0.0).beta == 0.0  # GRPO's own default: no KL term


def test_soft_labels_outside_zero_one_are_refused_in_forward():
    h, w = torch.randn(4, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (4, 3))
    with pytest.raises(ValueError, match="soft_labels holds 1.5: expected a number in \\[0, 1\\]"):
        PreferenceLoss("sigmoid")(h, w, labels, ref_logps=torch.zeros(4), soft_labels=torch.tensor([0.2, 1.5]))


def test_papers_names_and_did_you_mean():
    assert list(PreferenceLoss("dpo").fns) == ["sigmoid"] and PolicyLoss("GRPO").loss == "grpo"
    with pytest.raises(ValueError, match="loss 'sigmoud': unknown loss; did you mean 'sigmoid'"):
        PreferenceLoss("sigmoud")


def _empty_and_ignored():
    w = torch.randn(11, 8, requires_grad=True)
    return w, [(torch.randn(0, 3, 8, requires_grad=True), torch.zeros(0, 3, dtype=torch.long)),
               (torch.randn(4, 3, 8, requires_grad=True), torch.full((4, 3), -100))]


def test_empty_or_all_ignored_batch_gives_a_zero_loss_that_keeps_the_graph():
    fnn._WARNED.clear()
    w, cases = _empty_and_ignored()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for h, labels in cases:
            for loss, kw in ((PreferenceLoss("sigmoid"), dict(ref_logps=torch.zeros(h.shape[0]))),
                             (PolicyLoss("grpo"), dict(advantages=torch.ones(h.shape[0])))):
                out = loss(h, w, labels, **kw)
                assert out.loss.item() == 0.0 and not str(out.loss.item()).startswith("-")
                assert out.metrics == {} and out.loss.requires_grad
                out.loss.backward()
                assert h.grad is not None and w.grad is not None and not w.grad.any()
    assert sorted(str(c.message).split(":")[0] for c in caught) == ["PolicyLoss", "PreferenceLoss"]  # once each


def test_several_losses_report_each_term():
    torch.manual_seed(0)
    h, w = torch.randn(4, 3, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (4, 3))
    out = PreferenceLoss({"sigmoid": 1.0, "sft": 0.5})(h, w, labels, ref_logps=torch.zeros(4))
    assert out.loss.item() == pytest.approx(out.metrics["loss/sigmoid"] + 0.5 * out.metrics["loss/sft"], rel=1e-5)
    assert "loss/sigmoid" not in PreferenceLoss("sigmoid")(h, w, labels, ref_logps=torch.zeros(4)).metrics
