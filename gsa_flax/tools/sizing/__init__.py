"""Sizing a run on an accelerator you do not have: the training step compiled here for a
Cloud TPU slice or an NVIDIA GPU (deviceless), read per chip.

:mod:`~gsa_flax.tools.sizing.aot` (targets, chips, compile and analyze, roofline, batch
fit), :mod:`~gsa_flax.tools.sizing.hlo` (reading the compiled HLO: traffic, FLOPs, custom
calls) and :mod:`~gsa_flax.tools.sizing.report` (the train step for a target, per chip,
next to its counterpart network). ``python -m gsa_flax.tools.summary --target=...`` is
the command.
"""
