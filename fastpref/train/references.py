"""The frozen reference and the other models of a preference run: which reference mode the loss needs, the
reference model (``--ref-model`` or the policy as it enters preference training, saved to ``reference/``), its
log-probs of the training and held-out data (precomputed once, cached in ``ref_logps.safetensors`` under a key
of the reference weights and the data), ``--prev-model`` log-probs and the ``--token-reward-model``.
"""
from __future__ import annotations

import hashlib
import json

import torch

from . import data as D
from ..stats import token_logprobs
from .dist import model_state
from .fields import TEXTS
from .model import final_softcap, head, hidden_states, load_model
from .objective import Objective, dataset_logps, needs_token_ref, tensors, unpad
from .phases import strip_objective


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_digest(*sets: D.Dataset) -> str:
    h = hashlib.sha256()
    for ds in sets:
        h.update(json.dumps([e.seqs for e in ds.examples]).encode())
    return h.hexdigest()


class References:
    """The reference side of :class:`~fastpref.train.preference.PreferenceRun` (a mixin: it reads the run's
    settings, data, loss and policy)."""

    def _ref_mode(self) -> str:
        mode, token = self.cfg.ref_mode, needs_token_ref(self.loss)
        if mode == "precompute" and token:
            raise SystemExit(f"--loss {','.join(self.loss.fns)} needs reference token statistics every step: "
                             "use --ref-mode online (or auto)")
        if not self.loss.needs_ref:
            return "none"
        if mode == "auto":
            mode = "online" if token else "precompute"
        return mode

    def ref_inputs(self, b: D.Batch, idx: list[int]) -> dict:
        """The reference's part of a micro-batch's loss inputs (examples ``idx``, batch ``b``): precomputed
        sequence log-probs, or (online) its hidden states, head and softcap; {} without a reference."""
        ref: dict = {}
        if self.ref_mode == "precompute":
            r = self.ref_train[torch.tensor(idx)]
            ref["ref_logps"] = (r.T.reshape(-1) if self.train.layout == "pairs" else r.reshape(-1)).to(self.d.device)
        elif self.ref_mode == "online":
            with torch.no_grad(), self.autocast():
                ref["ref_hidden"] = hidden_states(self.ref, b.input_ids, b.position_ids, b.attention_mask)
            ref["ref_weight"], ref["ref_bias"] = head(self.ref)
            ref["ref_softcap"] = final_softcap(self.ref)
        return ref

    # ------------------------------------------------------------------------------------------- other models
    def setup_other_models(self) -> None:
        """--prev-model: its log-probs of the training data, once (SPPO / INPO / GPO); --token-reward-model:
        loaded for per-step token log-probs (TGDPO)."""
        cfg, d = self.cfg, self.d
        if cfg.prev_model and any(p.startswith("prev_") for p in self.loss.accepted) and self.prev_train is None:
            prev = load_model(cfg.prev_model).to(d.device).eval()
            self.prev_train = dataset_logps(Objective(prev, self.loss, final_softcap(prev), cfg.backend), self.train,
                                            packed=self.packed, pad_id=self.pad_id, batch_size=cfg.eval_batch_size,
                                            d=d, device=d.device, autocast=self.autocast,
                                            pack_length=self.pack_length).cpu()
        if cfg.token_reward_model and any(p.startswith("rm_") for p in self.loss.accepted) and self.token_rm is None:
            self.token_rm = load_model(cfg.token_reward_model).to(d.device).eval()
            for p in self.token_rm.parameters():
                p.requires_grad_(False)

    def other_inputs(self, b: D.Batch, idx: list[int]) -> tuple[dict, dict]:
        """(loss inputs from the other models, texts to score with the policy) for this micro-batch."""
        d, out, scored = self.d, {}, {}
        if self.prev_train is not None:
            r = self.prev_train[torch.tensor(idx)].to(d.device)
            out.update(prev_chosen_logps=r[:, 0], prev_rejected_logps=r[:, 1])
        if self.token_rm is not None:
            with torch.no_grad(), self.autocast():
                h = hidden_states(self.token_rm, b.input_ids, b.position_ids, b.attention_mask)
                h = unpad(h, b.keep) if b.cu_seqlens is not None else h
                w, bias = head(self.token_rm)
                out["rm_token_logps"] = token_logprobs(h, w, b.labels, bias=bias, softcap=final_softcap(self.token_rm),
                                                       backend=self.cfg.backend).float()
        for name, (_, _, feed) in TEXTS.items():
            if feed in self.loss.accepted and name in self.train.examples[0].texts:
                seqs = [self.train.examples[i].texts[name] for i in idx]
                scored[feed] = tensors(D.collate(seqs, packed=self.packed, pad_id=self.pad_id,
                                                 pack_length=self.pack_length).to(d.device))
        return out, scored

    # ------------------------------------------------------------------------------------------- reference
    def setup_reference(self) -> None:
        """The frozen reference: --ref-model, or the policy as it enters preference training (saved to
        ``reference/`` so a resumed run gets it back). Reference log-probs are precomputed once and cached."""
        cfg, d = self.cfg, self.d
        if self.ref_mode == "none":
            return
        if cfg.ref_model:
            ref = load_model(cfg.ref_model)
        else:
            ref = self.make_model()
            if self.sft_steps > 0:
                if self.step == self.sft_steps:
                    self.out.save_weights("reference", strip_objective(model_state(self.objective, d)),
                                          {"what": "reference = policy after SFT warm-up", "step": self.step})
                ref.load_state_dict(self.out.read_weights("reference"))
        self.ref = ref.to(self.d.device).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.ref_obj = Objective(self.ref, self.loss, final_softcap(self.ref), cfg.backend)
        key = _digest(self.ref.state_dict()) + _data_digest(*(s for s in (self.train, self.eval) if s)) + \
            str(self.packed)
        logps = self.out.cached_tensors("ref_logps", key)
        if logps is None:
            logps = {}
            kw = dict(packed=self.packed, pad_id=self.pad_id, batch_size=cfg.eval_batch_size, d=d,
                      device=d.device, autocast=self.autocast, pack_length=self.pack_length)
            if self.ref_mode == "precompute":
                logps["train"] = dataset_logps(self.ref_obj, self.train, **kw).cpu()
            if self.eval is not None:
                logps["eval"] = dataset_logps(self.ref_obj, self.eval, **kw).cpu()
            self.out.cache_tensors("ref_logps", logps, key)
        self.ref_train, self.ref_eval = logps.get("train"), logps.get("eval")
