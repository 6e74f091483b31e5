"""Integrations with model and trainer libraries; each submodule imports its library lazily.

* :mod:`fastpref.integrations.transformers`: per-token log-probs / statistics / KL straight from a Hugging Face
  causal LM (or a PEFT-wrapped one), and a patch that makes ``model(input_ids, labels=...)`` return log-probs.
* :mod:`fastpref.integrations.trl`: drop-in TRL trainers (``DPOTrainer``, ``KTOTrainer``,
  ``RewardTrainer``, ``GRPOTrainer`` from :mod:`fastpref.integrations.trl_grpo`) computing through fastpref.
"""

_SUBMODULES = ("transformers", "trl")


def __getattr__(name: str):
    """``fastpref.integrations.trl`` / ``.transformers`` import on first access (with their libraries)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
