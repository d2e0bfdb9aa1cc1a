"""m3ae: Multimodal Masked Autoencoders (Geng et al., 2022) in PyTorch."""
from ._version import __version__
from .config import Config, DataConfig, ModelConfig, TrainConfig, PRESETS, model_config
from .losses import M3AELoss, LossOutput
from .model import M3AE, M3AEOutput, create_model

__all__ = ["M3AE", "M3AEOutput", "M3AELoss", "LossOutput", "create_model", "Config", "ModelConfig",
           "DataConfig", "TrainConfig", "PRESETS", "model_config", "__version__"]
