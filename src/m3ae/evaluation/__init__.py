"""Evaluation: features, linear probe + kNN, fine-tuning, OOD detection, zero-shot
classification by reconstruction, attention and t-SNE pictures.

Typical use (the CLI commands ``m3ae embed / linear-probe / finetune / ood / zero-shot /
visualize`` do the same)::

    from m3ae.evaluation import load_labelled, cached_features, linear_probe
    train = cached_features("run/final", load_labelled("shards/train-*.tar.gz", 32))
    test = cached_features("run/final", load_labelled("shards/test-*.tar.gz", 32))
    print(linear_probe(train, test).as_dict())
"""
from .data import LabelledData, load_labelled, make_loader
from .features import Features, cached_features, encode_batch, extract_features, load_model, pool_tokens
from .finetune import Classifier, FinetuneResult, finetune
from .linear_probe import LinearProbe, ProbeResult, knn_classify, linear_probe, topk_accuracy, train_linear_probe
from .ood import Mahalanobis, OODResult, auroc, fpr_at_tpr, max_softmax, ood_scores, plot_roc, roc_curve
from .zero_shot import ZeroShotResult, build_prompt, zero_shot_classify, zero_shot_scores

__all__ = ["LabelledData", "load_labelled", "make_loader", "Features", "cached_features",
           "encode_batch", "extract_features", "load_model", "pool_tokens", "Classifier", "FinetuneResult",
           "finetune", "LinearProbe", "ProbeResult", "knn_classify", "linear_probe", "topk_accuracy",
           "train_linear_probe", "Mahalanobis", "OODResult", "auroc", "fpr_at_tpr", "max_softmax", "ood_scores",
           "plot_roc", "roc_curve", "ZeroShotResult", "build_prompt", "zero_shot_classify", "zero_shot_scores"]
