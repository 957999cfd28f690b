"""gsa_flax: Global Self-Attention Networks (Shen et al. 2020) in JAX/Flax."""
