"""Fused Triton kernels for fastpref (installed as ``fastpref.kernels``).

One module per kernel stage: stats_forward, stats_backward, kl_forward, kl_backward, the gemm backward's
stats_dlogits and kl_dlogits (host side ``gemm_backward``), the frozen-head forwards' epilogues stats_frozen
and kl_frozen (host side ``frozen_forward``); shared device helpers in ``tiles`` and ``dlogits``; block sizes
in ``presets``; launch and ahead-of-time specialization in ``launch``; ``python -m fastpref.kernels.report``
compiles every GPU configuration for sm_80/sm_90 and checks spills.

Nothing is imported here on purpose: the kernels must be decorated after TRITON_INTERPRET is decided.
"""
