"""One training run of one debiasing method on a group-annotated dataset; knows nothing about Optuna."""
from .config import TrainConfig
from .loop import NonFiniteLossError, fit

__all__ = ["NonFiniteLossError", "TrainConfig", "fit"]
