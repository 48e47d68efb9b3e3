"""Training loop, data and checkpoints for dlax (imported as `dlax_training`)."""
