"""Training on one worker: the plan, the DeepSpeed engine, the Trainer, checkpoint files."""
