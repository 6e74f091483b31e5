"""The training run: SFT warm-up on the preferred answers, then preference training against a frozen
reference; evaluation on held-out prompts, metrics, checkpoints, exact resume, the final model."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as C
from . import data as D
from .config import Config
from .dist import Dist, load_model_state, load_optim_state, model_state, optim_state, setup, wrap
from ..stats import token_logprobs
from .model import decoder, final_softcap, head, hidden_states, load_model, packing_supported, tiny_model
from .objective import (Objective, call, dataset_logps, dry_run, loss_inputs, make_loss, metrics, needs_kto_kl,
                        needs_token_ref, tensors, unpad)
from .fields import TEXTS
from .unpaired import kto_kl


def lr_at(step: int, total: int, base: float, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio·base`` (a pure function of the step: exact resume)."""
    warm = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _strip(state: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _tokenizer(cfg: Config):
    src = cfg.tokenizer or cfg.model
    if src is None:
        from .synthetic import load_tokenizer

        return load_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    return tok


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


class Run:
    """One training run (all state in one place so that checkpoints can capture and restore it)."""

    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.d = cfg, d
        self.t0 = time.time()
        self.out = Path(cfg.output_dir)
        self.ckdir = self.out / "checkpoints"
        self.log = print if d.main else (lambda *a, **k: None)
        self.tok = _tokenizer(cfg)
        self.pad_id = D.pad_id_of(self.tok)
        torch.manual_seed(cfg.seed)
        self.policy = self.make_model().to(d.device)
        self.softcap = final_softcap(self.policy)
        self._load_data()
        self.loss = make_loss(cfg.loss_weights(), cfg.loss_hparams(), self.train.layout,
                              self.train.num_responses, self.softcap, cfg.backend)
        self.ref_mode = self._ref_mode()
        ex0 = self.train.examples[0]
        provided = set(ex0.numbers) | set(ex0.texts) | \
            {name for name in ("prev_model", "token_reward_model") if getattr(cfg, name)}
        dry_run(self.loss, self.train.layout, self.train.num_responses, self.ref_mode, provided)
        if needs_kto_kl(self.loss) and cfg.batch_size < 2:
            raise SystemExit("KTO's reference point pairs each prompt with another completion of its micro-batch: "
                             "use --batch-size >= 2 (or --loss-args kl=0)")
        self.packed = self._packing()
        self.pack_length = cfg.pack_length if cfg.pack_length is not None else cfg.max_length
        if cfg.gradient_checkpointing:
            self.policy.config.use_cache = False
            if hasattr(self.policy, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                self.policy.activation_checkpointing_enable()
            else:
                self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.objective = Objective(self.policy, self.loss, self.softcap, cfg.backend)
        layers = list(getattr(decoder(self.policy), "layers", []))
        self.module = wrap(self.objective, layers, d)
        self.global_batch = cfg.batch_size * d.world * cfg.grad_accum
        self.sft_steps = cfg.sft_steps
        self.pref_steps = cfg.steps if cfg.steps is not None else \
            max(1, math.ceil(cfg.epochs * len(self.train) / self.global_batch))
        self.total = self.sft_steps + self.pref_steps
        self.step = 0
        self.ref = None
        self.ref_train = self.ref_eval = None
        self.prev_train = self.token_rm = None
        self.eval_history: list[dict] = []
        self.use_cuda_amp = d.device.type == "cuda" and cfg.bf16 != "off"

    # ------------------------------------------------------------------------------------------- set-up
    def make_model(self) -> nn.Module:
        """A fresh policy (the tiny demo model or --model), without disturbing the global RNG."""
        with torch.random.fork_rng(devices=[]):
            model = tiny_model(len(self.tok), self.cfg.seed) if self.cfg.model is None else load_model(self.cfg.model)
        return model.train()

    def _load_data(self) -> None:
        cfg = self.cfg
        tk = D.Tokenize(self.tok, cfg.max_length, cfg.max_prompt_length, cfg.truncation)
        self.verifier, self.eval_prompts = None, []  # greedy answers are scored where the task has a verifier
        if cfg.synthetic:
            from .synthetic import demonstrations, make_task, verify

            rows, held = make_task(cfg.synthetic_train, cfg.synthetic_eval)
            self.train = D.load_dataset(rows, tk, source="synthetic-train")
            self.sft_data = D.load_dataset(demonstrations(rows, seed=cfg.seed), tk, source="synthetic-demonstrations")
            self.eval = D.load_dataset(held, tk, source="synthetic-heldout")
            self.verifier, self.eval_prompts = verify, [r["prompt"] for r in held]
        else:
            full = D.load_dataset(cfg.data, tk, skip_bad_rows=cfg.skip_bad_rows)
            if cfg.eval_data:
                self.train = full
                self.eval = D.load_dataset(cfg.eval_data, tk, layout=full.layout, skip_bad_rows=cfg.skip_bad_rows)
            else:  # held-out prompts: a deterministic split by prompt, so no prompt is in both sets
                pick = lambda e: int(hashlib.sha256(e.prompt_key.encode()).hexdigest()[:8], 16) % 10_000 \
                    < cfg.eval_fraction * 10_000  # noqa: E731
                ev = [e for e in full.examples if pick(e)]
                tr = [e for e in full.examples if not pick(e)] or ev
                self.train = D.Dataset(full.layout, tr, full.source, full.skipped, full.truncated)
                self.eval = D.Dataset(full.layout, ev, full.source + " (held-out split)") if ev else None
            for ds in (self.train, self.eval):
                if ds is not None and ds.skipped:
                    self.log(f"{ds.source}: skipped {sum(ds.skipped.values())} bad rows: " +
                             "; ".join(f"{n}× {r}" for r, n in ds.skipped.most_common()))
            if self.train.truncated:
                self.log(f"{self.train.source}: {self.train.truncated} rows truncated to --max-length "
                         f"{cfg.max_length} (completion end cut)")
        if not cfg.synthetic:
            self.sft_data = self.train  # SFT warm-up on the preferred answers
        if self.eval is None:
            self.log("warning: no held-out rows (set --eval-data or --eval-fraction); evaluation is skipped")

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

    def _packing(self) -> bool:
        if self.cfg.packing == "off":
            return False
        ok = packing_supported(self.policy)
        if not ok:
            msg = (f"packed sequences (position_ids restarting per sequence) are not supported by "
                   f"{type(self.policy).__name__} with attn_implementation="
                   f"{getattr(self.policy.config, '_attn_implementation', '?')} here")
            if self.cfg.packing == "on":
                raise SystemExit(msg)
            self.log(f"note: {msg}; falling back to padded batches")
        return ok

    def autocast(self):
        if self.use_cuda_amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.cfg.bf16 == "on":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
            from .model import load_model as _load

            ref = _load(cfg.ref_model)
        else:
            ref = self.make_model()
            if self.sft_steps > 0:
                folder = self.out / "reference"
                if self.step == self.sft_steps:
                    state = _strip(model_state(self.objective, d))
                    if d.main:
                        C.write(folder, state, {}, {"what": "reference = policy after SFT warm-up",
                                                    "step": self.step})
                    d.barrier()
                state, _, _ = C.read(folder)
                ref.load_state_dict(state)
        self.ref = ref.to(self.d.device).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.ref_obj = Objective(self.ref, self.loss, final_softcap(self.ref), cfg.backend)
        key = _digest(self.ref.state_dict()) + _data_digest(*(s for s in (self.train, self.eval) if s)) + \
            str(self.packed)
        cache = self.out / "ref_logps.safetensors"
        tensors = None
        if cache.is_file():
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(cache), "pt") as f:
                same = (f.metadata() or {}).get("key") == key
            tensors = load_file(str(cache)) if same else None
        if tensors is None:
            tensors = {}
            kw = dict(packed=self.packed, pad_id=self.pad_id, batch_size=cfg.eval_batch_size, d=d,
                      device=d.device, autocast=self.autocast, pack_length=self.pack_length)
            if self.ref_mode == "precompute":
                tensors["train"] = dataset_logps(self.ref_obj, self.train, **kw).cpu()
            if self.eval is not None:
                tensors["eval"] = dataset_logps(self.ref_obj, self.eval, **kw).cpu()
            if d.main:
                from safetensors.torch import save_file

                tmp = cache.with_suffix(".tmp")
                save_file(tensors, str(tmp), metadata={"key": key})
                tmp.replace(cache)
            d.barrier()
        self.ref_train, self.ref_eval = tensors.get("train"), tensors.get("eval")

    # ------------------------------------------------------------------------------------------- steps
    def chunk(self, phase_start: int, step: int, micro: int) -> list[int]:
        """The examples of one micro-batch across all ranks: a pure function of (seed, phase, step, micro)."""
        cfg, d = self.cfg, self.d
        n = cfg.batch_size * d.world
        pos = ((step - phase_start) * cfg.grad_accum + micro) * n
        data = self.sft_data if phase_start == 0 else self.train
        return D.order(len(data), cfg.seed + (0 if phase_start == 0 else 7919), pos, n)

    def micro_step(self, phase: str, phase_start: int, step: int, micro: int) -> dict:
        cfg, d = self.cfg, self.d
        chunk = self.chunk(phase_start, step, micro)
        idx = chunk[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size]
        if phase == "sft":
            seqs = D.sequences(self.sft_data, idx, "target")
            count = sum(len(c) for _, c in D.sequences(self.sft_data, chunk, "target"))  # global target tokens
            if not seqs:  # e.g. an unpaired micro-batch without desirable rows
                seqs, count = D.sequences(self.sft_data, idx[:1]), 0
            b = D.collate(seqs, packed=self.packed, pad_id=self.pad_id, pack_length=self.pack_length).to(d.device)
            with self.autocast():
                out = call(self.module, b, mode="sft", norm=max(count, 1) / d.world)
            loss = out["loss"] * (1.0 if count else 0.0)
            (loss / cfg.grad_accum).backward()
            return {"loss": float(loss.detach()) * d.world}
        b = D.batch(self.train, idx, packed=self.packed, pad_id=self.pad_id, pack_length=self.pack_length,
                    sequence_labels=self.loss.nll_tokens == "sequence").to(d.device)
        ref: dict = {}
        if self.ref_mode == "precompute":
            r = self.ref_train[torch.tensor(idx)]
            ref["ref_logps"] = (r.T.reshape(-1) if self.train.layout == "pairs" else r.reshape(-1)).to(d.device)
        elif self.ref_mode == "online":
            with torch.no_grad(), self.autocast():
                ref["ref_hidden"] = hidden_states(self.ref, b.input_ids, b.position_ids, b.attention_mask)
            ref["ref_weight"], ref["ref_bias"] = head(self.ref)
            ref["ref_softcap"] = final_softcap(self.ref)
        inputs = loss_inputs(self.loss, self.train.layout, b.inputs)
        others, scored = self.other_inputs(b, idx)
        inputs.update(others)
        if needs_kto_kl(self.loss):
            inputs["kl"] = kto_kl(self.module, self.ref_obj, self.train, idx, max_length=cfg.max_length, d=d,
                                  device=d.device, autocast=self.autocast, packed=self.packed, pad_id=self.pad_id,
                                  pack_length=self.pack_length)
        with self.autocast():
            out = call(self.module, b, mode="pref", ref=ref, inputs=inputs, scored=scored)
        (out["loss"] / cfg.grad_accum).backward()
        return {"loss": float(out["loss"].detach()), **out["metrics"]}

    def greedy(self) -> dict:
        """The verifier's mean scores of the policy's greedy answers to the held-out prompts ({} without one)."""
        if self.verifier is None or self.d.mode == "fsdp":  # FSDP: the sharded policy runs only inside Objective
            return {}
        from .evaluate import greedy_scores

        with self.autocast():
            scores = greedy_scores(self.policy, self.tok, self.eval_prompts, self.verifier,
                                   batch_size=self.cfg.eval_batch_size, max_new_tokens=self.cfg.max_length)
        return {f"eval/greedy_{k}": v for k, v in scores.items()}

    def evaluate(self, phase: str = "pref") -> dict | None:
        """Held-out metrics: greedy-answer scores, and (preference phase) reward / ranking accuracy."""
        if phase == "sft":
            scores = self.greedy()
            if not scores:
                return None
            rec = {"step": self.step, "eval": True, "phase": "sft", **scores}
            self.eval_history.append(rec)
            self.write_metrics(rec)
            return rec
        if self.eval is None:
            return None
        pol = dataset_logps(self.module, self.eval, packed=self.packed, pad_id=self.pad_id,
                            batch_size=self.cfg.eval_batch_size, d=self.d, device=self.d.device,
                            autocast=self.autocast, pack_length=self.pack_length)
        m = metrics(self.eval, pol, self.ref_eval if self.loss.needs_ref else None, self.loss.beta)
        rec = {"step": self.step, "eval": True, "phase": "pref", **{f"eval/{k}": v for k, v in m.items()},
               **self.greedy()}
        self.eval_history.append(rec)
        self.write_metrics(rec)
        return rec

    def write_metrics(self, rec: dict) -> None:
        if self.d.main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self, opt: torch.optim.Optimizer, phase: str) -> None:
        d = self.d
        state = _strip(model_state(self.objective, d))
        trainer = {"step": self.step, "phase": phase, "optimizer": optim_state(self.objective, opt, d),
                   "rng": torch.get_rng_state(), "world": d.world,
                   "loss_state": {k: getattr(self.loss, k).cpu() for k in ("delta_mean", "delta_count")}}
        if torch.cuda.is_available():
            trainer["cuda_rng"] = torch.cuda.get_rng_state(d.device)
        if d.main:
            folder = C.write(self.ckdir / f"step-{self.step:08d}", state, trainer,
                             {"step": self.step, "phase": phase, "total_steps": self.total, "time": time.time()})
            C.prune(self.ckdir, self.cfg.keep_checkpoints, protect=folder)
        d.barrier()

    def resume(self) -> dict | None:
        """Restore model, RNG and counters from a checkpoint; returns the trainer state (optimizer inside)."""
        cfg = self.cfg
        if cfg.resume in (None, "", "no"):
            return None
        if cfg.resume == "auto":
            folder = C.latest_valid(self.ckdir, warn=self.log)
            if folder is None:
                self.log(f"--resume auto: no valid checkpoint in {self.ckdir}; starting from scratch")
                return None
        else:
            folder = Path(cfg.resume)
        try:
            mstate, trainer, info = C.read(folder)
        except C.CheckpointError as e:
            raise SystemExit(f"cannot resume: {e}") from None
        load_model_state(self.objective, {f"model.{k}": v for k, v in mstate.items()}, self.d)
        torch.set_rng_state(trainer["rng"])
        if "loss_state" in trainer:  # running statistics of the loss (BCO's δ)
            for k, v in trainer["loss_state"].items():
                getattr(self.loss, k).copy_(v)
        if "cuda_rng" in trainer and torch.cuda.is_available():
            torch.cuda.set_rng_state(trainer["cuda_rng"], self.d.device)
        self.step = int(trainer["step"])
        if self.d.main and (self.out / "metrics.jsonl").is_file():  # drop records past the checkpoint
            lines = (self.out / "metrics.jsonl").read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
            (self.out / "metrics.jsonl").write_text("".join(x + "\n" for x in keep))
        self.log(f"resumed from {folder} at step {self.step}/{self.total}")
        return trainer

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        cfg, d = self.cfg, self.d
        if d.main:  # nothing is written before this point (the set-up may still refuse the run)
            if cfg.overwrite and cfg.resume in (None, "", "no"):
                from .validate import clear_previous_run

                clear_previous_run(cfg.output_dir)
            self.out.mkdir(parents=True, exist_ok=True)
            if not cfg.resume and (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
        trainer = self.resume()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, initial=self.step, disable=not (d.main and cfg.progress), unit="step",
                   dynamic_ncols=True)
        before, last = None, None
        for phase, start, n, base_lr in (("sft", 0, self.sft_steps, cfg.sft_lr),
                                         ("pref", self.sft_steps, self.pref_steps, cfg.lr)):
            if n <= 0 or self.step >= start + n:
                continue
            bar.set_description(phase if phase == "sft" else ",".join(self.loss.fns))
            opt = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=base_lr,
                                    weight_decay=cfg.weight_decay)
            if trainer is not None and trainer["phase"] == phase and self.step > start:
                load_optim_state(self.objective, opt, trainer["optimizer"], d)
            if phase == "sft" and self.step == 0:
                self.evaluate("sft")  # the untrained model's greedy answers
            if phase == "pref":
                self.setup_reference()
                self.setup_other_models()
                if self.step == start:
                    before = self.evaluate()
            while self.step < start + n:
                lr = lr_at(self.step - start, n, base_lr, cfg.warmup_ratio, cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = lr
                recs = []
                for m in range(cfg.grad_accum):
                    ctx = self.module.no_sync() if (d.mode == "ddp" and m < cfg.grad_accum - 1) else \
                        contextlib.nullcontext()
                    with ctx:
                        recs.append(self.micro_step(phase, start, self.step, m))
                gn = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                                    cfg.max_grad_norm)
                gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.step += 1
                rec = self._reduce(recs)
                rec.update(step=self.step, phase=phase, lr=lr, grad_norm=float(gn), time=time.time() - self.t0)
                if self.step % max(cfg.log_every, 1) == 0 or self.step == start + n or self.step == 1:
                    self.write_metrics(rec)
                bar.update(1)
                post = {"loss": f"{rec['loss']:.4f}"}
                if "rewards/accuracies" in rec:
                    post["acc"] = f"{rec['rewards/accuracies']:.2f}"
                bar.set_postfix(post, refresh=False)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < start + n:
                    self.evaluate(phase)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                    self.save(opt, phase)
                last = (opt, phase)
            trainer = None
        bar.close()
        if self.pref_steps > 0 and self.ref is None and self.ref_mode != "none":
            self.setup_reference()  # resumed from the final checkpoint
        final = self.evaluate() if self.pref_steps > 0 else None
        if last is not None:
            self.save(*last)
        return self.finish(before, final)

    def _reduce(self, recs: list[dict]) -> dict:
        keys = sorted(set().union(*recs))
        vals = torch.tensor([sum(r.get(k, 0.0) for r in recs) / len(recs) for k in keys], dtype=torch.float64)
        self.d.sum_(vals)
        return {k: float(v) / self.d.world for k, v in zip(keys, vals)}

    def before_record(self) -> dict | None:
        """The held-out evaluation as preference training began (read back from metrics.jsonl after a resume)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return None
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        found = [r for r in recs if r.get("eval") and r.get("phase") == "pref" and r["step"] == self.sft_steps]
        return found[0] if found else None

    def finish(self, before: dict | None, final: dict | None) -> dict:
        cfg, d = self.cfg, self.d
        state = _strip(model_state(self.objective, d))
        wall = time.time() - self.t0
        if before is None and d.main:
            before = self.before_record()
        greedy = lambda rec: {k[len("eval/greedy_"):]: v for k, v in (rec or {}).items()  # noqa: E731
                              if k.startswith("eval/greedy_")} or None
        summary = {
            "eval_greedy_before": greedy(before), "eval_greedy_after": greedy(final),
            "eval_reward_accuracy": final and final.get("eval/reward_accuracy"),
            "eval_ranking_accuracy": final and final.get("eval/ranking_accuracy"),
            "eval_margin": final and final.get("eval/margin"),
            "eval_before": {k: v for k, v in (before or {}).items() if k.startswith("eval/")},
            "train_steps": self.step, "sft_steps": self.sft_steps, "preference_steps": self.pref_steps,
            "wall_seconds": round(wall, 2), "loss": self.loss.weights,
            "hparams": {**self.loss.hparams, **({"delta": "running"} if self.loss.running_delta else {})},
            "layout": self.train.layout, "train_examples": len(self.train),
            "eval_examples": len(self.eval) if self.eval else 0, "packed": self.packed,
            "ref_mode": self.ref_mode, "distributed": d.mode, "world_size": d.world,
            "skipped_rows": sum(self.train.skipped.values()), "truncated_rows": self.train.truncated,
            "final_model": str(self.out / "final"), "data": cfg.data or "synthetic",
            **environment(cfg.backend, d.device),
        }
        if d.main:
            final_dir = self.out / "final"
            self.policy_for_save().save_pretrained(str(final_dir), state_dict=state, safe_serialization=True)
            self.tok.save_pretrained(str(final_dir))
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            if cfg.plots:
                from .plots import plot

                plot(self.out / "metrics.jsonl", self.out)
            from .plots import table

            print(table(summary))
        d.barrier()
        return summary

    def policy_for_save(self) -> nn.Module:
        """A plain (unwrapped, unsharded) model object to call ``save_pretrained`` on with the full state."""
        return self.make_model() if self.d.mode == "fsdp" else self.policy


def environment(backend: str, device: torch.device) -> dict:
    """What produced the numbers: the fused-op backend (the one 'auto' picked), device and package versions."""
    import fastpref
    from ..backends import resolve

    try:
        picked = resolve(backend, device, torch.float32).name
    except ValueError as e:
        picked = f"unavailable ({e})"
    versions = {"fastpref": getattr(fastpref, "__version__", None), "torch": torch.__version__}
    for name in ("transformers", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"backend": picked, "backend_requested": backend, "device": str(device), "versions": versions}


def train(cfg: Config) -> dict:
    """Run training with this configuration; returns the summary (also written to summary.json)."""
    if cfg.task == "reward":
        from .reward import train_reward

        return train_reward(cfg)
    cfg = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = setup(cfg.distributed, cfg.device)
    try:
        return Run(cfg, d).run()
    finally:
        d.close()
