"""Training: the run's configuration (:mod:`.config`), the engines that run a step
(:mod:`.engines`), the loop (:mod:`.loop`), evaluation, resuming, signals, the run lock, the CPU
worker processes (:mod:`.parallel`), the device-driven GPU step and its CUDA graph
(:mod:`.graph`), statistics and logs."""
