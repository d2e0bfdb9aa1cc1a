"""m3ae ood: out-of-distribution detection with Mahalanobis distance (class means + shared
covariance of encoder features, fitted on in-distribution training data) and maximum softmax
probability (of a linear probe, or of a fine-tuned classifier); AUROC, FPR at 95% TPR, ROC PNG."""
from __future__ import annotations

from .eval_common import DATA_HELP, add_eval_command, add_feature_args, features_for, write_results

EPILOG = """example (the paper's CIFAR-100 vs CIFAR-10 has the same shape):
  m3ae ood runs/c10/final --id-train '../shared/data/cifar10/train-*.tar.gz' \\
      --id-test '../shared/data/cifar10/test-*.tar.gz' --ood '../shared/data/tiny-imagenet-captions/val-*.tar.gz' \\
      --out runs/c10/ood
"""


def register(sub) -> None:
    p = add_eval_command(sub, "ood", "OOD detection: Mahalanobis and MSP, AUROC / FPR@95 and ROC curves",
                         __doc__, EPILOG, out="folder for results.json and roc.png")
    p.add_argument("--id-train", required=True, help="in-distribution training data (labelled); " + DATA_HELP)
    p.add_argument("--id-test", required=True, help="in-distribution test data")
    p.add_argument("--ood", required=True, help="out-of-distribution test data (labels not needed)")
    p.add_argument("--classifier", default=None, help="fine-tuned classifier folder (m3ae finetune --out) for MSP; "
                                                      "default: a linear probe trained on --id-train")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None, help="limit for --id-test and --ood each")
    p.add_argument("--probe-epochs", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    add_feature_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..evaluation.data import data_name
    from ..evaluation.ood import ood_scores, plot_roc

    id_train = features_for(args, args.id_train, args.limit_train, "id-train features")
    id_test = features_for(args, args.id_test, args.limit_test, "id-test features")
    ood = features_for(args, args.ood, args.limit_test, "ood features")
    id_logits = ood_logits = None
    if args.classifier:
        from ..device import resolve_device
        from ..evaluation.data import load_labelled, make_loader
        from ..evaluation.finetune import Classifier

        clf = Classifier.load(args.classifier).to(resolve_device(args.device))
        size = clf.model.config.image_size
        id_logits = clf.predict_logits_loader(make_loader(load_labelled(args.id_test, size, limit=args.limit_test),
                                                          batch_size=args.batch_size))[0]
        ood_logits = clf.predict_logits_loader(make_loader(load_labelled(args.ood, size, limit=args.limit_test),
                                                           batch_size=args.batch_size))[0]
    res = ood_scores(id_train, id_test, ood, probe_epochs=args.probe_epochs, seed=args.seed,
                     id_logits=id_logits, ood_logits=ood_logits)
    msp_from = "fine-tuned classifier" if args.classifier else "linear probe"
    for name, m in res.metrics.items():
        print(f"{name:12s} AUROC {m['auroc']:.4f}  FPR@95%TPR {m['fpr95']:.4f}")
    print(f"(in-distribution: {len(id_test)} test samples, OOD: {len(ood)}; MSP from the {msp_from}"
          + (f", whose in-distribution top-1 is {res.id_accuracy:.2%})" if res.id_accuracy is not None else ")"))
    png = plot_roc(res, Path(args.out) / "roc.png",
                   title=f"in: {data_name(args.id_test)}  vs  OOD: {data_name(args.ood)}")
    write_results(args.out, "results.json", {"metrics": res.metrics, "id_accuracy": res.id_accuracy,
                                             "msp_from": msp_from, "num_id": len(id_test), "num_ood": len(ood),
                                             "model": str(args.model), "id_train": args.id_train,
                                             "id_test": args.id_test, "ood": args.ood}, args)
    print(f"wrote {png} and {Path(args.out) / 'results.json'}")
    return 0
