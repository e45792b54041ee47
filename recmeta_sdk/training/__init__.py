"""The training layer: turns an interaction log into a trained network.

Data preparation, losses and the training loop (:mod:`.loop`), and the meta-learning tasks
(:mod:`.meta_tasks`).
"""
