"""The output folder's low-level rules, shared by :mod:`fastpref.train.outputs` and its parts: JSON without bare
NaN, writes that fail as one line, and content digests."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (so that its JSON is valid JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


@contextlib.contextmanager
def writing(path: Path, *tmp: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (a full disk, a read-only folder) into a one-line refusal, after
    removing the temporary files or folders ``tmp``."""
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError):
            why = e.strerror or str(e)
        elif type(e).__name__ == "SafetensorError" and "I/O error: " in str(e):  # safetensors' own I/O errors
            why = str(e).split("I/O error: ", 1)[1]
        else:
            raise
        for t in tmp:
            shutil.rmtree(t, ignore_errors=True) if t.is_dir() else t.unlink(missing_ok=True)
        raise SystemExit(f"cannot write {path}: {why} (the previous files are left as they were)") from None


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of ``obj``'s JSON with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
