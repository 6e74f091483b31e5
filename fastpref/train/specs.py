"""The loss specification as a user writes it (``--loss``, ``--loss-args``, or the same keys in YAML), parsed
into plain mappings. Used by the configuration and by its checks, so it depends on neither."""
from __future__ import annotations

from typing import Any


def _scalar(v: str) -> Any:
    import yaml

    return yaml.safe_load(v)


def parse_loss(spec: Any) -> dict[str, float]:
    """``"sigmoid"``, ``"sigmoid=1,sft=0.5"``, a list of names or a {name: weight} mapping → {name: weight}."""
    if isinstance(spec, dict):
        return {str(k): float(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        out: dict[str, float] = {}
        for s in spec:
            out.update(parse_loss(s))
        return out
    out = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        name, _, w = part.partition("=")
        out[name.strip()] = float(w) if w.strip() else 1.0
    if not out:
        raise ValueError("--loss names no loss")
    return out


def parse_kv(spec: Any) -> dict[str, Any]:
    """``"label_smoothing=0.1,f_divergence_type=js"`` or a mapping → {key: value} (YAML scalars)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, (list, tuple)):
        out: dict[str, Any] = {}
        for s in spec:
            out.update(parse_kv(s))
        return out
    out = {}
    for part in str(spec).split(","):
        if part.strip():
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"--loss-args: expected key=value, got {part!r}")
            out[k.strip()] = _scalar(v.strip())
    return out
