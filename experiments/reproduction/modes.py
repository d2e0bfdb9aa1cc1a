"""The reproduction's modes (model, pre-training budget, evaluation sizes), the paper's numbers
and the runs each mode makes. A mode is a frozen :class:`Mode`; a variant of one is
``dataclasses.replace(mode, ...)`` (as :func:`smoke_of` and the planner do)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ModelSize:
    image_size: int
    patch_size: int


@dataclass(frozen=True)
class Mode:
    preset: str  # the m3ae.config preset of the model
    model: ModelSize
    text_len: int  # caption tokens
    vocab: int  # WordPiece vocabulary (at most)
    caption_limit: int | None  # captions the tokenizer trains on (None: all)
    train_shards: int | None  # Tiny-ImageNet train shards read (None: all)
    steps: int | str  # pre-training steps, or "plan": sized by the planner to fit ``budget_s``
    batch_size: int
    lr: float
    probe_train: int  # images the linear probe trains on (the first of the pre-training set)
    val: int  # Tiny-ImageNet val images it is measured on
    cifar_test: int  # CIFAR-10 test images (far-OOD set; near-OOD test set)
    cifar_train: int  # CIFAR-10 train images (near-OOD fit)
    probe_epochs: int
    seeds: tuple[int, ...]
    ablations: bool  # claims 2 and 3: the paired-fraction and text-mask-ratio runs (first seed)
    pictures: bool  # reconstructions and attention of the first seed's main runs
    attention_rows: int
    warmup: int | None = None  # warm-up steps; planned modes get theirs from the plan
    classes: int | None = None  # a Tiny-ImageNet class subset (every 200/classes-th class)
    budget_s: float | None = None  # planned modes: the wall-clock budget (--budget-s overrides)
    step_range: tuple[int, int] | None = None  # planned modes: the smallest and largest step count
    warmup_fraction: float = 0.05  # planned modes: warm-up as a fraction of the planned steps
    fewshot: int | None = None  # images per class of the few-shot probe (None: no few-shot probe)
    paired_fractions: tuple[float, ...] = (0.1, 0.3)  # claim 2's runs
    text_mask_ratios: tuple[float, ...] = (0.15, 0.5, 0.9)  # claim 3's runs; 0.75 is the default M3AE run
    pool: str = "cls"  # the readout of the verdicts and of OOD
    cache: bool = False  # decode every dataset once into an image cache and pre-train from it
    precision: str = "fp32"
    plan_steps: int = 15  # planned modes: steps timed of each model kind
    caption_check: int = 2000  # captioned images of the caption diagnostic

    def settings(self) -> dict:
        """The mode as plain data (the report's ``settings``)."""
        return asdict(self)


MODES: dict[str, Mode] = {
    # For the test: seconds, on a slice; the numbers mean nothing.
    "smoke": Mode(preset="tiny", model=ModelSize(32, 4), text_len=16, vocab=256, caption_limit=300, train_shards=1,
                  steps=3, batch_size=8, lr=1e-3, warmup=1, probe_train=96, val=48, cifar_test=48, cifar_train=48,
                  probe_epochs=3, seeds=(0,), ablations=False, pictures=True, attention_rows=1),
    # The tiny preset at 32 px (Tiny-ImageNet resized from 64), 2 shards (10k pairs), 100 steps.
    "quick": Mode(preset="tiny", model=ModelSize(32, 4), text_len=32, vocab=4096, caption_limit=None,
                  train_shards=2, steps=100, batch_size=64, lr=1.5e-3, warmup=10, probe_train=4000, val=2000,
                  cifar_test=2000, cifar_train=2000, probe_epochs=50, seeds=(0, 1), ablations=True, pictures=True,
                  attention_rows=4),
    # The 32-px design of 2026-11-30 (inconclusive), kept for its report: docs/results/standard32.md.
    "standard32": Mode(preset="tiny", model=ModelSize(32, 4), text_len=64, vocab=4096, classes=100,
                       caption_limit=None, train_shards=None, steps=600, batch_size=128, lr=2e-3, warmup=40,
                       probe_train=10000, val=5000, cifar_test=2000, cifar_train=2000, probe_epochs=50,
                       seeds=(0, 1, 2), ablations=True, paired_fractions=(0.1,), text_mask_ratios=(0.15,),
                       pool="cls", pictures=True, attention_rows=4),
    # 64 px with 8 px patches (the same 8x8 token grid as standard32, so the same transformer
    # cost), images from a cache, the step count planned to fit 90 min on 2 CPU cores.
    "standard": Mode(preset="tiny", model=ModelSize(64, 8), text_len=64, vocab=4096, classes=100,
                     caption_limit=None, train_shards=None, steps="plan", budget_s=5400, step_range=(600, 2400),
                     batch_size=128, lr=2e-3, warmup_fraction=1 / 15, probe_train=10000, val=5000, cifar_test=2000,
                     cifar_train=2000, probe_epochs=50, fewshot=10, seeds=(0, 1, 2), ablations=True,
                     paired_fractions=(0.1,), text_mask_ratios=(0.15,), pool="cls", pictures=True,
                     attention_rows=4, cache=True),
    # A GPU: ViT-S/8 at 64 px on every Tiny-ImageNet caption pair in --data (all 200 classes),
    # bf16, the steps planned to fit --budget-s. The LR is not tuned (1e-3 at batch 256).
    "gpu": Mode(preset="small", model=ModelSize(64, 8), text_len=64, vocab=8192, caption_limit=None,
                train_shards=None, steps="plan", budget_s=330, step_range=(200, 20000), batch_size=256, lr=1e-3,
                warmup_fraction=0.05, probe_train=20000, val=10000, cifar_test=5000, cifar_train=10000,
                probe_epochs=50, fewshot=10, seeds=(0, 1, 2), ablations=True, paired_fractions=(0.1,),
                text_mask_ratios=(0.15,), pool="cls", pictures=True, attention_rows=4, cache=True,
                precision="bf16"),
    # Claim 1 across compute (experiments/compute_curve.py): the standard mode's data, model and
    # evaluation, MAE and M3AE each trained once per seed on one cosine schedule to 10,400 steps
    # (16x the standard mode's 650) and read out on the way; warm-up 1/15 of the steps as there.
    "compute": Mode(preset="tiny", model=ModelSize(64, 8), text_len=64, vocab=4096, classes=100,
                    caption_limit=None, train_shards=None, steps=10400, warmup=693, batch_size=128, lr=2e-3,
                    probe_train=10000, val=5000, cifar_test=2000, cifar_train=2000, probe_epochs=50, fewshot=10,
                    seeds=(0, 1, 2), ablations=False, pool="cls", pictures=False, attention_rows=4, cache=True),
    # 64 px with 8 px patches (the same 8x8 token grid), all 40k pairs, ~20 epochs, full eval sets.
    "full": Mode(preset="tiny", model=ModelSize(64, 8), text_len=32, vocab=8192, caption_limit=None,
                 train_shards=8, steps=6000, batch_size=128, lr=1.5e-3, warmup=300, probe_train=40000, val=10000,
                 cifar_test=10000, cifar_train=25000, probe_epochs=90, seeds=(0, 1, 2), ablations=True,
                 pictures=True, attention_rows=4),
}

# --smoke: a planned, cached mode's code path at the smoke mode's sizes, in seconds on a CPU.
SMOKE = dict(preset="tiny", model=ModelSize(32, 4), text_len=16, vocab=256, caption_limit=300, train_shards=1,
             classes=None, budget_s=60, step_range=(3, 3), batch_size=8, lr=1e-3, probe_train=96, val=48,
             cifar_test=48, cifar_train=48, probe_epochs=3, fewshot=2, seeds=(0,), ablations=False,
             precision="fp32", plan_steps=2, caption_check=32)


def smoke_of(mode: Mode) -> Mode:
    """``mode`` at smoke size: the same structure (cache, plan, readouts), tiny numbers."""
    return replace(mode, **SMOKE)


# The paper's numbers (ViT-B/16, 50 epochs on CC12M; ImageNet linear probe; CIFAR OOD).
PAPER = {
    "claim1": {"mae": 44.6, "m3ae": 61.3},
    "claim2": {0.1: 53.3, 0.2: 54.0, 0.3: 54.5, 1.0: 58.8},
    "claim3": "text mask ratios of 50-90% beat 15% (BERT's); 75% is best",
    "claim4": {"mahalanobis": {"mae": 69.0, "m3ae": 71.4}, "msp": {"mae": 77.2, "m3ae": 78.5}},
}


@dataclass
class RunSpec:
    name: str
    seed: int
    overrides: list[str] = field(default_factory=list)
    ood: bool = False  # OOD evaluation (the main comparison only)
    kind: str = "m3ae"  # "mae" or "m3ae"
    paired_fraction: float = 1.0
    text_mask_ratio: float = 0.75


def run_specs(mode: Mode) -> list[RunSpec]:
    specs = []
    for seed in mode.seeds:
        specs.append(RunSpec(f"mae_s{seed}", seed, ["data.paired_fraction=0.0"], ood=True, kind="mae",
                             paired_fraction=0.0))
        specs.append(RunSpec(f"m3ae_s{seed}", seed, [], ood=True))
    if mode.ablations:
        seed = mode.seeds[0]
        for p in mode.paired_fractions:
            specs.append(RunSpec(f"m3ae_paired{p}_s{seed}", seed, [f"data.paired_fraction={p}"],
                                 paired_fraction=p))
        for r in mode.text_mask_ratios:
            specs.append(RunSpec(f"m3ae_textmask{r}_s{seed}", seed, [f"model.text_mask_ratio={r}"],
                                 text_mask_ratio=r))
    return specs
