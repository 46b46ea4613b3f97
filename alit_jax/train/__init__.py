"""Training: objectives, train state, steps and the `train_and_evaluate` loop."""
