"""The worker: loads a model on one device (one tensor-parallel rank) and runs the steps it is sent."""
