"""Experiment configs (ml_collections); each file has get_config()."""
