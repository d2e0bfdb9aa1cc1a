"""m3ae: Multimodal Masked Autoencoders (Geng et al., 2022) in PyTorch.

Three lines from a trained model to features (docs/api.md)::

    model, tokenizer, transform = m3ae.load_pretrained("runs/demo/final")
    feats = model.encode(transform(image), *tokenizer("a picture of a red circle"))

Task helpers (fill in the blank, reconstruction, zero-shot) are in :mod:`m3ae.tasks`.
"""
from ._version import __version__
from .config import Config, DataConfig, ModelConfig, TrainConfig, PRESETS, model_config
from .factory import ImageTransform, ModelInfo, get_tokenizer, list_models, load_pretrained, model_info
from .losses import M3AELoss, LossOutput
from .model import M3AE, M3AEOutput, create_model
from .tokenizer import TextTokenizer

__all__ = ["M3AE", "M3AEOutput", "M3AELoss", "LossOutput", "create_model", "Config", "ModelConfig",
           "DataConfig", "TrainConfig", "PRESETS", "model_config", "load_pretrained", "get_tokenizer",
           "list_models", "model_info", "ModelInfo", "ImageTransform", "TextTokenizer", "__version__"]


def __getattr__(name: str):
    # CaptionTokenizer was the tokenizer load_pretrained returned; TextTokenizer now is that class.
    if name == "CaptionTokenizer":
        import warnings

        warnings.warn("m3ae.CaptionTokenizer is now m3ae.TextTokenizer", DeprecationWarning, stacklevel=2)
        return TextTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
