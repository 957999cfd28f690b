"""gsa_flax: Global Self-Attention Networks (Shen et al. 2020) in JAX/Flax.

Four wings, importing one way (``tools`` -> ``train`` -> ``model | data``):

- :mod:`gsa_flax.model`: the Pallas kernels, the pure attention ops, the linen layers, the
  networks, transfer between resolutions and the portable weights files. Pure JAX.
- :mod:`gsa_flax.data`: datasets, augmentation and the input pipelines. TensorFlow; knows
  nothing of the model.
- :mod:`gsa_flax.train`: config checks, the train state, the step, evaluators, the workdir,
  checkpoints, preemption and the loop (:func:`gsa_flax.train.trainer.train_and_evaluate`).
- :mod:`gsa_flax.tools`: predict, visualize, export, summary and accelerator sizing.

Below them, :mod:`gsa_flax.errors` holds the one error type of a user's mistake.
"""
