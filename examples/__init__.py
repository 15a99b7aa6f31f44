"""Example models, datasets and training scripts (installed as ``tm_tensorboard.examples``)."""
