"""Training loop, hooks, evaluation and checkpoints."""
