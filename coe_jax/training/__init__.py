"""Training: the trainer (`train`), its jitted step (`train_step`), the optimizer
(`optim`) and checkpoints (`checkpointing`).

Above `objective`, `evaluation` and `parallel`; only `serving` and the entry
points import from here.
"""
