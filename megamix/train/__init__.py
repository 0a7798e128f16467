"""The training loop, checkpoints, optimizer and metrics."""
