"""Third-party chatter off for the command line: no progress bars or advisory warnings from Hugging Face
libraries, and no DeepSpeed accelerator notice on machines without a GPU. Only defaults: a variable the user
set wins, and the library API (``import fastpref``) changes nothing."""
from __future__ import annotations

import os

DEFAULTS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",       # "Loading weights", "Writing model shards" bars of transformers
    "TRANSFORMERS_VERBOSITY": "error",          # its advisory warnings (fastpref reports what matters itself)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_third_party() -> None:
    """Sets the defaults above in the environment (inherited by torchrun workers); call before transformers
    or DeepSpeed are imported."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():  # DeepSpeed then picks the CPU anyway, after a warning
            os.environ["DS_ACCELERATOR"] = "cpu"
