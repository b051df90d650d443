"""The memory of one training step: setup, optimizers, activations, device terms, the estimate and the fit search."""
