"""Optimizers (:mod:`.optimizers`, on their base :mod:`.optimizer`), learning-rate schedules
(:mod:`.schedules`) and weight averaging (:mod:`.averaging`); ``from lenet_xp.optim import
Adam`` as before."""

from lenet_xp.optim.optimizers import OPTIMIZERS, SGD, Adam, AdamW, Optimizer, make_optimizer

__all__ = ["OPTIMIZERS", "SGD", "Adam", "AdamW", "Optimizer", "make_optimizer"]
