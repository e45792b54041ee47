"""The training layer: data preparation, losses and the training loop (:mod:`.loop`), and the
meta-learning tasks (:mod:`.meta_tasks`)."""
