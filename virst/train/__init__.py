"""Training: losses, stage schedule, data, the trainer loop."""
