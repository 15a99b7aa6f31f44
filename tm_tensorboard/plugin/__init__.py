"""The TensorBoard plugin (read side): imports neither torch nor the SDK, only ``tm_tensorboard.metadata``."""
