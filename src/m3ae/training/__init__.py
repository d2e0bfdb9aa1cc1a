"""Training: optimiser and schedule, checkpoints, the pre-training loop."""
from ..optim import build_optimizer, build_scheduler, lr_at, param_groups
from .trainer import PretrainResult, TrainingDiverged, pretrain

__all__ = ["pretrain", "PretrainResult", "TrainingDiverged", "build_optimizer", "build_scheduler", "lr_at",
           "param_groups"]
