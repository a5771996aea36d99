"""Training: schedules, optimizer, checkpoints, metrics, the train loop."""
