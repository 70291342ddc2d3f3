"""Training on Ray Train workers: the plan, batch sources, the Trainer (metrics, evaluation),
checkpoint files, and ``worker.train_loop_per_worker``, the function Ray Train runs."""
