"""Training: optimizer, state, objective, the pure train step, and the loop."""
