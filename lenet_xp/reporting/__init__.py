"""A run's pictures (:mod:`.plots`, matplotlib) and its HTML report (:mod:`.report`); the
commands ``python -m lenet_xp.plots`` and ``python -m lenet_xp.report`` draw them."""
