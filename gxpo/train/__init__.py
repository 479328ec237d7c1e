"""The training loop, the jitted update step, the device mesh and logging."""
