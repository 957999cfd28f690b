"""Training: the config checks, the train state, the step, evaluators, the workdir ledger,
checkpoints, preemption and the loop (:func:`gsa_flax.train.trainer.train_and_evaluate`).

Imports the model and the data wings; nothing here imports :mod:`gsa_flax.tools`.
"""
