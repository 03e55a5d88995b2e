"""The generic reconstruction core: units, capture, losses, the optimisation loop, mixed precision."""
