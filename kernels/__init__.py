"""Fused Triton kernels for fastpref (installed as ``fastpref.kernels``).

One module per kernel stage: stats_forward, stats_backward, kl_forward, kl_backward; shared device
helpers in ``tiles``; block sizes in ``presets``; launch and ahead-of-time specialization in ``launch``;
``python -m fastpref.kernels.report`` compiles every GPU configuration for sm_80/sm_90 and checks spills.

Nothing is imported here on purpose: the kernels must be decorated after TRITON_INTERPRET is decided.
"""
