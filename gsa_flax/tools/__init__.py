"""Tools built on the library: predict, visualize, export, summary, attention maps, and
:mod:`gsa_flax.tools.sizing` (accelerator sizing from deviceless compiles).

The top wing: it imports :mod:`gsa_flax.train`, :mod:`gsa_flax.model` and
:mod:`gsa_flax.data`; nothing below imports it.
"""
