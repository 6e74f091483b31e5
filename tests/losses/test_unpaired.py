"""KTO, APO-zero-unpaired, BCO vs naive float64 formulas (catalog L09, L25)."""
import pytest
import torch

from _ref import B, check, gen, logps, logsig, near, sig

import fastpref.losses as L

LABELS = torch.tensor([True, False, True, True, False, False])


def inputs(seed):
    g = gen(seed)
    ref = logps(g, B)
    return dict(logps=near(g, ref, 5.0), ref_logps=ref, desirable=LABELS)


def ref_kto(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, kl=None, logps=None, ref_logps=None, desirable=None,
            kl_logps=None, ref_kl_logps=None):
    if kl is None:
        kl = (kl_logps - ref_kl_logps).mean().detach()
    z0 = max(float(kl), 0.0)
    h = logps - ref_logps
    out = torch.empty_like(h)
    for i in range(len(h)):  # naive per-example branch
        if desirable[i]:
            out[i] = desirable_weight * (1 - sig(beta * (h[i] - z0)))
        else:
            out[i] = undesirable_weight * (1 - sig(beta * (z0 - h[i])))
    return out


@pytest.mark.parametrize("hp", [dict(kl=0.7), dict(kl=-0.3), dict(kl=0.2, beta=0.5, desirable_weight=1.3, undesirable_weight=0.8)])
def test_kto_given_reference_point(hp):
    check(L.kto, ref_kto, inputs(1), ("logps",), hp=hp)


def test_kto_estimates_reference_point_from_mismatched_pairs():
    x = inputs(2)
    g = gen(3)
    idx = L.kto_mismatched_index(B)
    assert idx.tolist() == [B - 1] + list(range(B - 1))  # prompt i paired with completion i-1, as TRL cycles
    kl_ref = logps(g, B)
    x.update(kl_logps=near(g, kl_ref, 4.0) + 2.0, ref_kl_logps=kl_ref)
    check(L.kto, ref_kto, x, ("logps", "kl_logps"))  # z0 detached: no gradient to kl_logps in either
    with pytest.raises(ValueError, match="kl_logps"):
        L.kto(**inputs(2))


def test_apo_zero_unpaired_and_bco():
    x = inputs(4)

    def apo(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, logps=None, ref_logps=None, desirable=None):
        h = logps - ref_logps
        return torch.where(desirable, desirable_weight * (1 - sig(beta * h)), undesirable_weight * sig(beta * h))

    def bco(beta=0.1, delta=0.0, logps=None, ref_logps=None, desirable=None):
        r = beta * (logps - ref_logps)
        return torch.where(desirable, -logsig(r - delta), -logsig(-(r - delta)))

    check(L.apo_zero_unpaired, apo, x, ("logps",), hp=dict(beta=0.3, undesirable_weight=2.0))
    check(L.bco, bco, x, ("logps",))
    check(L.bco, bco, x, ("logps",), hp=dict(delta=torch.tensor(0.4, dtype=torch.float64)))
