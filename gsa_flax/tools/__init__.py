"""Tools built on the library: attention maps, prediction, model sizing, accelerator targets.

A leaf package: it imports the core library (``ops``, ``layers``, ``models``, ``state``,
``checkpointing``, ``input_pipeline``), and nothing in the core imports it.
"""
