"""Fused Triton kernels for fastpref (installed as ``fastpref.kernels``).

One module per kernel stage: stats_forward, stats_backward, kl_forward, kl_backward, the gemm backward's
stats_dlogits and kl_dlogits (host side ``gemm_backward``), the frozen-head forwards' epilogues stats_frozen
and kl_frozen (host side ``frozen_forward``); shared device helpers in ``tiles`` and ``dlogits``; block sizes
in ``presets``; launch and ahead-of-time specialization in ``launch``; ``python -m fastpref.kernels.report``
compiles every GPU configuration for sm_80/sm_90 and checks spills.

Nothing is imported here on purpose: the kernels must be decorated after TRITON_INTERPRET is decided.
"""

if __name__ == "kernels":  # this folder reached as a top-level module (e.g. from the repository root)
    # The repository keeps the Triton kernels in a folder named ``kernels``, which is also the import name of
    # Hugging Face's kernel-hub client that transformers uses. Whenever Python finds this folder first (the
    # current directory precedes site-packages), hand the name over to that package or fail as if absent.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path
             if os.path.realpath(os.path.join(os.path.abspath(p or os.curdir), "kernels")) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is fastpref.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file ends
    _spec.loader.exec_module(_module)
