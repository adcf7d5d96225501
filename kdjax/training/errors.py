"""The error a training run stops with when the user must act."""


class TrainingError(RuntimeError):
  """A run stopped for a reason the user must act on (message says which)."""
