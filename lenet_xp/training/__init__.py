"""Training: the run's configuration (:mod:`.config`), the engines that run a step
(:mod:`.engines`), the loop (:mod:`.loop`), evaluation, resuming, signals, the run lock, the CPU
worker processes (:mod:`.parallel`), the fused CUDA step (:mod:`.fused`), statistics and logs."""
