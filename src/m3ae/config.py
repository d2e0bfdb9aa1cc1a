"""Typed configs (model, data, training), named model presets, YAML/JSON files and overrides.

A run is described by one :class:`Config`; the CLI builds it from a preset, an optional
YAML/JSON file and ``section.field=value`` overrides, and saves the resolved result in the
run folder.
"""
from __future__ import annotations

import difflib
import functools
import json
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

# The allowed values of the enumerated fields. A new value is one more word here; the check
# (check_choice), its error message and the modules that dispatch on the value read it from here.
Source = Literal["synthetic", "webdataset", "hdf5", "table", "imagefolder", "text", "cache", "mixture"]
ImageBackend = Literal["tensor", "pil"]
CachePlacement = Literal["auto", "cpu"]
CacheInterpolation = Literal["bilinear", "bicubic"]
MixtureMode = Literal["batch", "sample"]
GeluApproximate = Literal["tanh", "none"]
Precision = Literal["fp32", "bf16", "fp16"]
Strategy = Literal["ddp", "fsdp"]
TextLossNorm = Literal["batch", "text"]


@dataclass
class ModelConfig:
    """Architecture numbers. Defaults follow the paper's ViT-B/16 M3AE."""

    image_size: int = 256
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 30522  # BERT-uncased WordPiece
    max_text_len: int = 64  # longest caption the position table covers
    emb_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    dec_emb_dim: int = 512
    dec_depth: int = 8
    dec_num_heads: int = 16
    mlp_ratio: float = 4.0
    use_type_embedding: bool = True
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.75
    # The official JAX code uses LayerNorm eps 1e-6 and the tanh-approximated GELU.
    ln_eps: float = 1e-6
    gelu_approximate: GeluApproximate = "tanh"
    # Std of the caption embedding table at init. The official code uses N(0, 1) (Flax's
    # nn.Embed default), which makes a token's identity as strong as its sin-cos position;
    # MAE-style N(0, 0.02) leaves it ~50x weaker than the position at the start of training.
    text_embed_init_std: float = 1.0
    # Stochastic depth of the encoder blocks, rising linearly to this rate at the last block
    # (MAE/timm); 0 in pre-training, the official fine-tuning recipe uses 0.1.
    drop_path: float = 0.0
    # Encoder only, without decoder and heads (e.g. the official Colab's PyTorch weights).
    encoder_only: bool = False

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for width, heads, name in ((self.emb_dim, self.num_heads, "emb_dim"),
                                   (self.dec_emb_dim, self.dec_num_heads, "dec_emb_dim")):
            if width % heads:
                raise ValueError(f"{name}={width} is not divisible by its number of heads {heads}")
            if width % 4:
                raise ValueError(f"{name}={width} must be divisible by 4 for the 2-D sin-cos table")
        if not self.text_embed_init_std > 0:
            raise ValueError(f"text_embed_init_std must be positive, got {self.text_embed_init_std}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.in_chans


_DECODER = dict(dec_emb_dim=512, dec_depth=8, dec_num_heads=16)

#: Named architectures. Entries set numbers only; :func:`model_config` builds from them.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests and the demo: 32 px images, 4 px patches (an 8x8 grid), a small vocabulary.
    "tiny": dict(image_size=32, patch_size=4, vocab_size=1024, max_text_len=64, emb_dim=128,
                 depth=4, num_heads=4, dec_emb_dim=64, dec_depth=2, dec_num_heads=4),
    "small": dict(emb_dim=384, depth=12, num_heads=6, **_DECODER),
    "base": dict(emb_dim=768, depth=12, num_heads=12, **_DECODER),
    "large": dict(emb_dim=1024, depth=24, num_heads=16, **_DECODER),
    "huge": dict(emb_dim=1280, depth=32, num_heads=16, **_DECODER),
}
for _size in ("small", "base", "large", "huge"):
    PRESETS[f"m3ae_{_size}_patch16"] = PRESETS[_size]


def model_config(preset: str = "base", **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset, with fields overridden."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


@dataclass
class DataConfig:
    """Where samples come from and how they become tensors."""

    source: Source = "synthetic"  # docs/data.md
    # Where the data is: shard paths/URLs/brace patterns (several joined by '::'), or the
    # HDF5 file, table file, image folder, text file/folder, or cache folder (m3ae cache build).
    urls: str = ""
    synthetic_size: int = 20000  # synthetic: number of distinct samples
    synthetic_seed: int = 0
    # vocab.txt / tokenizer.json / folder / cached HF name; "from-data" = train one on the
    # source's captions; "" = built for synthetic data, else bert-base-uncased from the cache
    tokenizer: str = ""
    text_len: int = 64  # tokens per caption (the paper's and the official code's length)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    # A flip swaps these words in the caption (whole words, any case), so that spatial words
    # stay true; English by default: add your language's pairs, e.g. [[left, right], [trái, phải]].
    flip_swaps_left_right: bool = True
    flip_word_pairs: list = field(default_factory=lambda: [["left", "right"]])
    shuffle_buffer: int = 2000
    num_workers: int = 0
    paired_fraction: float = 1.0  # fraction of pairs that keep their caption
    # Column (table), field (HDF5) or key (JSONL) names; "" = the usual names (docs/data.md).
    image_column: str = ""
    caption_column: str = ""
    text_column: str = ""
    # Mixture: a list of entries, each a mapping of DataConfig fields (source, urls,
    # paired_fraction, ...) plus "weight"; unset fields come from this config.
    mixture: list = field(default_factory=list)
    mixture_mode: MixtureMode = "batch"  # "batch": each batch from one entry; "sample": mixed within a batch
    weight: float = 1.0  # a mixture entry's share
    resample: bool = False  # webdataset: draw shards with replacement (fewer shards than readers)
    max_caption_chars: int = 1000  # longer captions are truncated (counted)
    max_skip_fraction: float = 0.05  # more skipped samples than this stops the run
    reduced_decode: bool = True  # JPEGs much larger than needed decode at 1/2, 1/4 or 1/8 size
    # "tensor": plain JPEGs decode straight to uint8 tensors (torchvision); crop, resize and flip
    # run on uint8, float comes last (faster per sample: benchmarks/RESULTS.md, "Data loading
    # at 256 px"). "pil": Pillow resizes, then float and normalise (the earlier path; the pixels
    # differ slightly, docs/data.md).
    image_backend: ImageBackend = "tensor"
    prefetch_factor: int = 2  # batches each worker prepares ahead
    # webdataset pre-training: "cuda" decodes each batch's JPEGs on the GPU (nvJPEG, batched) and
    # crops, resizes and flips there; the workers only read headers. "cpu": per sample in the workers.
    decode_device: str = "cpu"
    # source=cache: "auto" keeps the images in GPU memory when they fit (under 40 % of what is
    # free), else in memory-mapped host memory; "cpu" always the latter.
    cache_placement: CachePlacement = "auto"
    # source=cache: the batched crop's resampling, "bilinear" or "bicubic" (benchmarks/RESULTS.md).
    cache_interpolation: CacheInterpolation = "bilinear"
    tokenizer_vocab_size: int = 1000  # tokenizer="from-data": vocabulary size to train
    tokenizer_cased: bool = False  # tokenizer="from-data": keep upper case
    tokenizer_keep_accents: bool = False  # tokenizer="from-data": keep accents (e.g. Vietnamese)

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of ``m3ae pretrain``."""

    steps: int = 1000
    batch_size: int = 64  # per device (process); global batch = batch_size x processes x accum_steps
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)
    base_lr: float = 1.5e-4  # scaled by the global batch / 256
    lr: float | None = None  # absolute LR; overrides base_lr when set
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off (official code: 1e9; MAE: none)
    # The demo's masking option (docs/training.md, "Hiding a whole quarter"): the fraction of
    # each batch (its first rows; batches are shuffled) whose image mask hides one whole
    # random quarter of the image first, the rest of the ratio at random
    # (m3ae.ops.hide_a_quarter_first). 0 = the paper's uniform masking.
    quarter_mask_fraction: float = 0.0
    image_loss_weight: float = 1.0
    text_loss_weight: float = 0.5
    # How the masked-token cross-entropy is averaged over samples: "batch" divides the sum of
    # per-sample means by the number of samples in the batch, so samples without a caption
    # add 0 (the official code); "text" divides by the samples that carry a text loss, which
    # makes the text term stronger the fewer captions a batch has.
    text_loss_norm: TextLossNorm = "batch"
    # True: AdamW also decays LayerNorm scales, as the official code (and so the paper's
    # numbers) did. False (default): MAE/timm's rule, no decay on any 1-D parameter.
    decay_norm_scales: bool = False
    norm_pix_loss: bool = False
    # The text head scores only the masked tokens, fused with its cross-entropy so that the
    # (tokens x vocabulary) logits are never stored (m3ae.ops.linear_cross_entropy). false:
    # the head, then a log-softmax, on the same rows: the same losses and gradients, slower.
    fused_text_loss: bool = True
    precision: Precision = "fp32"  # "fp32", "bf16" (autocast, CPU or GPU) or "fp16" (GPU, gradient scaler)
    device: str = "auto"
    seed: int = 0
    strategy: Strategy = "ddp"  # with several processes: "ddp" or "fsdp" (FSDP2 fully_shard, large models)
    grad_checkpointing: bool = False  # recompute encoder/decoder blocks in backward (less memory)
    compile: bool = False  # torch.compile the training step
    # CUDA: deterministic kernels (torch.use_deterministic_algorithms, cuBLAS's fixed workspace),
    # so that a resumed run matches an uninterrupted one bit for bit; a little slower. CPU
    # kernels are deterministic already (docs/training.md, "Checkpoints, resume").
    deterministic: bool = False
    # CPU training (glibc): freed memory stays in the process instead of going back to the
    # OS, so the next step does not page-fault its big buffers back in (benchmarks/RESULTS.md,
    # "What changed"). Process-wide; RSS then stays at the step's high-water mark.
    keep_freed_memory: bool = True
    max_nonfinite_steps: int = 10  # stop after this many non-finite steps in a row (0 = never)
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    recon_every: int = 500
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the 'tensorboard' extra)
    wandb: bool = False  # also log to Weights & Biases (needs the 'wandb' extra)
    wandb_project: str = "m3ae"

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 <= self.quarter_mask_fraction <= 1.0:
            raise ValueError(f"train.quarter_mask_fraction must be in [0, 1], got {self.quarter_mask_fraction}")
        if self.accum_steps < 1 or self.batch_size < 1:
            raise ValueError("train.batch_size and train.accum_steps must be at least 1")
        for name in ("lr", "base_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):  # also catches NaN
                raise ValueError(f"train.{name} must be a positive learning rate such as 1e-4, got {value}")

    def global_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.accum_steps * world_size

    def lr_for(self, world_size: int = 1) -> float:
        """Peak LR: ``lr`` if set, else ``base_lr`` x global batch / 256 (MAE's linear rule)."""
        return self.lr if self.lr is not None else self.base_lr * self.global_batch(world_size) / 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "base"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        d = dict(d)
        preset = d.pop("preset", "base")
        model = model_config(preset, **_coerce_section(ModelConfig, d.pop("model", {}) or {}))
        data = DataConfig(**_coerce_section(DataConfig, d.pop("data", {}) or {}))
        train = TrainConfig(**_coerce_section(TrainConfig, d.pop("train", {}) or {}))
        if d:
            raise ValueError(f"unknown config sections: {sorted(d)}")
        return cls(model=model, data=data, train=train, preset=preset)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write

        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(
            self.to_dict(), sort_keys=False)
        atomic_write(path, text)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(read_config_file(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping with sections model/data/train")
    return d


_SECTION_OF = {"ModelConfig": "model", "DataConfig": "data", "TrainConfig": "train"}


@functools.cache
def _hints(cls) -> dict[str, Any]:
    """Field name -> its annotation as a type (the annotations are strings in this module)."""
    return get_type_hints(cls)


def _closest(name: str, known) -> str:
    """'; did you mean X?' for a likely typo, else the list of known names."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {sorted(known)}"


def check_choice(where: str, value: Any, choices: Any, error: type[ValueError] = ValueError) -> Any:
    """``value`` if it is one of the values of ``choices`` (a ``Literal`` such as
    :data:`Source`), else a one-line ``error`` that lists them and names the closest one."""
    allowed = get_args(choices)
    if isinstance(value, str) and value in allowed:
        return value
    listed = ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}" if len(allowed) > 1 else repr(allowed[0])
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise error(f"{where} must be {listed}, got {value!r}{hint}")


def check_choices(cfg) -> None:
    """Check every ``Literal`` field of a section config (its ``__post_init__``): also configs
    built in Python, from mixture entries or from a pretrained ``config.json``, which do not
    pass through :func:`_check_value`."""
    section = _SECTION_OF[type(cfg).__name__]
    for name, hint in _hints(type(cfg)).items():
        if get_origin(hint) is Literal:
            check_choice(f"{section}.{name}", getattr(cfg, name), hint)


def _check_value(where: str, value: Any, hint: Any) -> Any:
    """``value`` as the declared type ``hint``, or a one-line ValueError naming the field.
    Looser spellings from YAML and overrides are converted: 1e5 for an int, [0.2, 1] for a
    tuple of floats, nothing (``data.tokenizer=``) for a str."""
    def bad(what: str):
        return ValueError(f"{where} must be {what}, got {value!r}")

    if get_origin(hint) in (Union, types.UnionType):  # only `X | None` is declared
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
    if get_origin(hint) is Literal:
        return check_choice(where, value, hint)
    if value is None:
        if hint is str:
            return ""
        raise bad(f"a value of type {getattr(hint, '__name__', hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # e.g. steps: 1e5 in a YAML file
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("a string")
        return str(value)
    if get_origin(hint) is tuple:
        n = len(get_args(hint))
        if not isinstance(value, (list, tuple)) or len(value) != n or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad(f"a list of {n} numbers such as [0.2,1.0]")
        return tuple(float(v) for v in value)
    if hint is list and not isinstance(value, list):
        raise bad("a list")
    return value


def _coerce_section(cls, values: dict[str, Any]) -> dict[str, Any]:
    known = _hints(cls)
    section = _SECTION_OF[cls.__name__]
    for k in sorted(set(values) - set(known)):
        raise ValueError(f"unknown {cls.__name__} field {section}.{k}{_closest(k, known)}")
    return {k: _check_value(f"{section}.{k}", v, known[k]) for k, v in values.items()}


def _parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, '[0.2,1]' -> [0.2, 1], 'abc' -> 'abc'."""
    try:
        return float(text) if any(c in text for c in ".eE") and not text.isalpha() else int(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings to a config dict (in place, also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if key.strip() == "preset":
            d["preset"] = value
            continue
        if len(parts) != 2 or parts[0] not in ("model", "data", "train"):
            raise ValueError(f"override key {key!r} must be model.X, data.X, train.X or preset")
        section = d.setdefault(parts[0], {}) or {}
        d[parts[0]] = section
        section[parts[1]] = _parse_value(value)
    return d


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: list[str] | None = None) -> Config:
    """Preset < config file < overrides, each later one winning."""
    d: dict[str, Any] = read_config_file(config_file) if config_file else {}
    if preset is not None:
        d["preset"] = preset
    apply_overrides(d, overrides or [])
    return Config.from_dict(d)
