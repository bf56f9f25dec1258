"""DINOv2 pretraining: train state, sharded train step, checkpoints and the training loop."""
