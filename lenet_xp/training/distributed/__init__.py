"""Data-parallel training over MPI ranks (``mpiexec -n N python -m lenet_xp.train ...``).

- :mod:`.comm`: whether this process is one of several MPI ranks, and the
  :class:`~.comm.World` it belongs to (mpi4py's ``COMM_WORLD``).
- :mod:`.engine`: :class:`~.engine.RankParallel`, which runs this rank's slice of every global
  batch and sums the gradients, the loss, the correct count and the stop flag with one
  all-reduce of one flat buffer per step.
- :mod:`.graph`: :class:`~.graph.RankGraphStep`, the graph engine's step of a GPU rank, cut
  in two around the all-reduce.
- :mod:`.launch`: the checks and set-up a run does once at its start.
- :mod:`.bench`: ``--workers N`` against ``mpiexec -n N``, measured.

See docs/distributed.md.
"""
