"""The networks, the losses and the training loop."""
