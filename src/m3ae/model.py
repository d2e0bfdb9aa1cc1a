"""The M3AE model: one transformer encoder over image patches and caption tokens, a light decoder.

Read top to bottom: transformer blocks, then :class:`M3AE` with its encoder path
(:meth:`M3AE.forward_encoder`), decoder path (:meth:`M3AE.forward_decoder`), the training
forward and the feature extractor. The architecture and initialisation follow the paper and
the official JAX code (young-geng/m3ae_public) so that its checkpoints load unchanged:
pre-norm blocks with a fused qkv projection, LayerNorm eps 1e-6, tanh GELU, fixed sin-cos
positions, learned modality type embeddings and one mask token per modality.

Inputs are images (B, C, H, W) normalised as in training, and captions as token ids (B, T)
with a padding mask (True = padding). Either modality may be absent (``None``), and
``image_valid`` (B,) marks samples of a mixed batch that have no image.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from .config import ModelConfig, model_config
from .ops import (Masking, keep_tokens, patchify, pool_tokens, resolve_blocks, restore_tokens, sincos_1d,
                  sincos_2d)
from .pretrained import (from_pretrained, load_weights, push_to_hub, read_model_config, resolve_pretrained,
                         save_pretrained)


# ------------------------------------------------------------------------ blocks
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # output laid out [q | k | v], heads in order
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                return_attention: bool = False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # A fixed rule: PyTorch's CPU attention kernels are much slower in bf16 than in
            # float32, the backward especially (benchmarks/RESULTS.md, "CPU, bench-cpu, batch
            # 32, two threads"), and attention is a small share of the FLOPs, so under CPU
            # autocast it runs in float32.
            with torch.autocast("cpu", enabled=False):
                out, weights = attention(q.float(), k.float(), v.float(), attn_mask, return_attention)
        else:
            out, weights = attention(q, k, v, attn_mask, return_attention)
        out = self.proj(out.transpose(1, 2).reshape(b, n, d))
        return (out, weights) if return_attention else out


# On CPU, PyTorch's fused attention kernel costs more than plain matmul + softmax for short
# sequences and less for long ones (fwd+bwd; the measured crossover is in benchmarks/RESULTS.md,
# "explicit attention for short CPU sequences"). Under torch.compile the fused op is left to
# the compiler.
EXPLICIT_CPU_ATTENTION_MAX_LEN = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d) masked) v for (B, H, L, d) inputs; ``attn_mask`` True = attend.

    Returns (output, weights); the weights only with ``return_weights`` (visualisation),
    which, like short sequences on CPU, takes the explicit path; otherwise PyTorch's fused
    ``scaled_dot_product_attention``.
    """
    explicit = return_weights or (q.device.type == "cpu" and q.shape[-2] <= EXPLICIT_CPU_ATTENTION_MAX_LEN
                                  and not torch.compiler.is_compiling())
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # scaling q: (L, d) < (L, L) products
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    weights = logits.softmax(-1)
    return weights @ v, (weights if return_weights else None)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu_approximate: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); each branch
    dropped per sample with probability ``drop_path`` in training (stochastic depth)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, gelu_approximate: str,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate)
        self.drop_path = StochasticDepth(drop_path, "row")  # identity in eval mode or at 0

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of blocks and a final LayerNorm; optional activation checkpointing."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, eps: float,
                 gelu_approximate: str):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, eps, gelu_approximate)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                return_intermediates: bool = False):
        mask = None if key_valid is None else key_valid[:, None, None, :]
        intermediates = []
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
            if return_intermediates:
                intermediates.append(x)
        x = self.norm(x)
        return (x, intermediates) if return_intermediates else x


# ------------------------------------------------------------------------ outputs
class M3AEOutput(NamedTuple):
    """What one training forward produces; the loss lives in :mod:`m3ae.losses`.

    ``image_mask`` / ``text_mask`` are True where the loss applies: positions hidden from
    the encoder that hold a real patch / a real (non-padding) caption token.
    ``text_hidden`` holds the decoder's states at the caption positions (the text head's
    input); ``text_logits`` the head's output at every position, unless the forward was
    called with ``text_logits=False`` (training: the loss scores only the masked tokens).
    """

    image_pred: torch.Tensor | None    # (B, L_img, patch_dim)
    image_target: torch.Tensor | None  # (B, L_img, patch_dim), patchified input pixels
    image_mask: torch.Tensor | None    # (B, L_img) bool
    text_logits: torch.Tensor | None   # (B, T, V)
    text_target: torch.Tensor | None   # (B, T) token ids
    text_mask: torch.Tensor | None     # (B, T) bool
    latent: torch.Tensor               # (B, 1 + slots, D) encoder output, CLS first
    text_hidden: torch.Tensor | None = None  # (B, T, decoder width)


class EncoderOutput(NamedTuple):
    latent: torch.Tensor              # (B, 1 + image slots + text slots, D)
    key_valid: torch.Tensor | None    # (B, 1 + slots) bool, None when every slot is real
    image_masking: Masking | None
    text_masking: Masking | None
    image_valid: torch.Tensor | None  # (B,) bool, None when every sample has an image
    text_valid: torch.Tensor | None   # (B, T) bool, False at caption padding
    intermediates: list | None = None


# -------------------------------------------------------------------------- model
class M3AE(nn.Module):
    """Multimodal masked autoencoder: one encoder over image patches and caption tokens, a
    light decoder predicting the hidden patches and words.

    ``forward`` is the masked pre-training pass (an :class:`M3AEOutput`); ``encode_image`` /
    ``encode_text`` / ``encode`` give pooled features (B, emb_dim); ``forward_features`` the
    encoder's tokens. Build one with :func:`create_model` or load one with
    :func:`m3ae.load_pretrained` / :meth:`from_pretrained`.
    """

    # Whether the image head predicts per-patch normalised pixels (train.norm_pix_loss), as
    # recorded in a pretrained folder; pictures un-normalise its predictions accordingly.
    norm_pix_loss: bool = False

    def __init__(self, config: ModelConfig | None = None, **overrides):
        super().__init__()
        cfg = config if config is not None else model_config("base")
        if overrides:
            cfg = ModelConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        d, dd = cfg.emb_dim, cfg.dec_emb_dim
        block_args = (cfg.mlp_ratio, cfg.ln_eps, cfg.gelu_approximate)

        # Encoder inputs.
        self.patch_embed = nn.Linear(cfg.patch_dim, d)  # on patchified pixels
        self.text_embed = nn.Embedding(cfg.vocab_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.use_type_embedding:
            self.encoder_image_type = nn.Parameter(torch.zeros(1, 1, d))
            self.encoder_text_type = nn.Parameter(torch.zeros(1, 1, d))
            if not cfg.encoder_only:
                self.decoder_image_type = nn.Parameter(torch.zeros(1, 1, dd))
                self.decoder_text_type = nn.Parameter(torch.zeros(1, 1, dd))
        self.encoder = Transformer(d, cfg.depth, cfg.num_heads, *block_args)

        self.set_drop_path(cfg.drop_path)

        # Decoder (absent from an encoder-only model: forward_decoder says so).
        if not cfg.encoder_only:
            self.decoder_embed = nn.Linear(d, dd)
            self.image_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.text_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.decoder = Transformer(dd, cfg.dec_depth, cfg.dec_num_heads, *block_args)
            self.image_head = nn.Linear(dd, cfg.patch_dim)
            self.text_head = nn.Linear(dd, cfg.vocab_size)

        # Fixed position tables (not saved: they follow from the config).
        self.register_buffer("enc_image_pos", sincos_2d(d, cfg.grid_size)[None], persistent=False)
        self.register_buffer("enc_text_pos", sincos_1d(d, cfg.max_text_len)[None], persistent=False)
        if not cfg.encoder_only:
            self.register_buffer("dec_image_pos", sincos_2d(dd, cfg.grid_size)[None], persistent=False)
            self.register_buffer("dec_text_pos", sincos_1d(dd, cfg.max_text_len)[None], persistent=False)
        self.reset_parameters()

    # --------------------------------------------------------------- bookkeeping
    def reset_parameters(self) -> None:
        """MAE's initialisation: xavier-uniform linears, zero biases, N(0, 0.02) tokens; the
        caption embedding N(0, ``text_embed_init_std``) (1.0: the official code's)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if p.dim() == 3:  # cls, type and mask tokens
                nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.text_embed.weight, std=self.config.text_embed_init_std)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay: biases, norms, tokens, embeddings tables."""
        names = set()
        for name, p in self.named_parameters():
            if p.dim() <= 1 or name.endswith("_token") or name.endswith("_type") \
                    or name == "text_embed.weight":
                names.add(name)
        return names

    def group_matcher(self, name: str) -> int:
        """Layer id for layer-wise LR decay: 0 = embeddings, i+1 = encoder block i, depth+1 = rest."""
        if name.startswith(("patch_embed", "text_embed", "cls_token", "encoder_image_type",
                            "encoder_text_type")):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return self.config.depth + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable
        if not self.config.encoder_only:
            self.decoder.grad_checkpointing = enable

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth in the encoder, rising linearly from 0 at the first block to
        ``rate`` at the last (MAE's fine-tuning rule); active in train mode only."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {rate}")
        depth = len(self.encoder.blocks)
        for i, blk in enumerate(self.encoder.blocks):
            blk.drop_path.p = rate * i / max(depth - 1, 1)

    @property
    def has_decoder(self) -> bool:
        return not self.config.encoder_only

    def _require_decoder(self) -> None:
        if self.config.encoder_only:
            raise ValueError("this M3AE is encoder-only (no decoder or output heads, e.g. weights converted "
                             "from the official Colab's .pth): it cannot reconstruct images or predict "
                             "words; use encode_image / encode_text / forward_features")

    # The pretrained folder: functions of m3ae.pretrained (config.json + model.safetensors [+ tokenizer.json]).
    def save_pretrained(self, directory, tokenizer=None, **kwargs):
        return save_pretrained(self, directory, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path, map_location: str = "cpu", revision: str | None = None,
                        strict: bool = True) -> M3AE:
        return from_pretrained(cls, name_or_path, map_location, revision, strict)

    def push_to_hub(self, repo_id: str, tokenizer=None, **kwargs) -> str:
        return push_to_hub(self, repo_id, tokenizer, **kwargs)

    def _type(self, name: str) -> torch.Tensor | float:
        return getattr(self, name) if self.config.use_type_embedding else 0.0

    # ------------------------------------------------------------------- encoder
    def embed_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels -> (patch tokens with positions and type, patchified pixels)."""
        cfg = self.config
        if image.shape[-1] != cfg.image_size or image.shape[-2] != cfg.image_size:
            raise ValueError(f"expected {cfg.image_size}x{cfg.image_size} images, got "
                             f"{tuple(image.shape[-2:])}")
        patches = patchify(image, cfg.patch_size)
        x = self.patch_embed(patches) + self.enc_image_pos + self._type("encoder_image_type")
        return x, patches

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        t = text.shape[1]
        if t > self.config.max_text_len:
            raise ValueError(f"caption length {t} exceeds max_text_len={self.config.max_text_len}")
        return self.text_embed(text) + self.enc_text_pos[:, :t] + self._type("encoder_text_type")

    def forward_encoder(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                        text_padding_mask: torch.Tensor | None = None,
                        image_valid: torch.Tensor | None = None, *,
                        image_mask_ratio: float = 0.0, text_mask_ratio: float = 0.0,
                        generator: torch.Generator | None = None,
                        image_noise: torch.Tensor | None = None,
                        text_noise: torch.Tensor | None = None,
                        return_intermediates: bool = False):
        """Embed, mask and encode. Returns (EncoderOutput, patchified pixels or None).

        The encoder sequence is CLS, then the kept image patches, then the kept caption
        tokens. With both mask ratios 0 nothing is shuffled, so the output keeps the input
        order (CLS, all patches, all caption positions) as in the official code.
        """
        if image is None and text is None:
            raise ValueError("M3AE needs an image, a caption, or both")
        ref = image if image is not None else text
        b = ref.shape[0]
        parts = [self.cls_token.expand(b, -1, -1)]
        valids = [torch.ones(b, 1, dtype=torch.bool, device=ref.device)]
        needs_mask = False
        img_m = txt_m = patches = text_valid = None

        if image is not None:
            x_img, patches = self.embed_image(image)
            n = x_img.shape[1]
            all_valid = image_valid is None
            valid = (torch.ones(b, n, dtype=torch.bool, device=image.device) if all_valid
                     else image_valid.bool()[:, None].expand(b, n))
            x_img, img_m = keep_tokens(x_img, valid, image_mask_ratio, generator, image_noise, all_valid)
            parts.append(x_img)
            valids.append(img_m.slot_valid)
            needs_mask |= not all_valid

        if text is not None:
            if text_padding_mask is None:
                text_padding_mask = torch.zeros_like(text, dtype=torch.bool)
            text_valid = ~text_padding_mask.bool()
            x_txt, txt_m = keep_tokens(self.embed_text(text), text_valid, text_mask_ratio, generator, text_noise)
            parts.append(x_txt)
            valids.append(txt_m.slot_valid)
            needs_mask = True

        x = torch.cat(parts, dim=1)
        key_valid = torch.cat(valids, dim=1) if needs_mask else None
        out = self.encoder(x, key_valid, return_intermediates=return_intermediates)
        latent, inter = out if return_intermediates else (out, None)
        image_valid = None if image is None or image_valid is None else image_valid.bool()
        return EncoderOutput(latent, key_valid, img_m, txt_m, image_valid, text_valid, inter), patches

    # ------------------------------------------------------------------- decoder
    def forward_decoder(self, enc: EncoderOutput):
        """Decoder over CLS + every image position + every caption position.

        Returns (decoder hidden states of the image positions, of the caption positions).
        """
        self._require_decoder()
        y = self.decoder_embed(enc.latent)
        b = y.shape[0]
        parts, valids = [y[:, :1]], [torch.ones(b, 1, dtype=torch.bool, device=y.device)]
        needs_mask, start, lengths = False, 1, []
        # (masking, mask token, positions, type, which positions are attended to: None = all).
        # Samples without an image: their (mask-token) image positions are not attended to;
        # caption padding stays invisible in the decoder too.
        streams = ((enc.image_masking, self.image_mask_token, self.dec_image_pos, "decoder_image_type",
                    None if enc.image_valid is None else enc.image_valid[:, None]),
                   (enc.text_masking, self.text_mask_token, self.dec_text_pos, "decoder_text_type", enc.text_valid))
        for m, mask_token, pos, type_name, attended in streams:
            if m is None:
                lengths.append(0)
                continue
            n = m.ids_restore.shape[1]
            parts.append(restore_tokens(y[:, start:start + m.num_slots], m, mask_token, pos, self._type(type_name)))
            start += m.num_slots
            if attended is None:
                valids.append(torch.ones(b, n, dtype=torch.bool, device=y.device))
            else:
                valids.append(attended.expand(b, n))
                needs_mask = True
            lengths.append(n)
        n_img, n_txt = lengths
        x = torch.cat(parts, dim=1)
        key_valid = torch.cat(valids, dim=1) if needs_mask else None
        x = self.decoder(x, key_valid)
        return x[:, 1:1 + n_img], x[:, 1 + n_img:1 + n_img + n_txt]

    # ------------------------------------------------------------------- forward
    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_padding_mask: torch.Tensor | None = None,
                image_valid: torch.Tensor | None = None, *,
                image_mask_ratio: float | None = None, text_mask_ratio: float | None = None,
                generator: torch.Generator | None = None,
                image_noise: torch.Tensor | None = None, text_noise: torch.Tensor | None = None,
                text_logits: bool = True) -> M3AEOutput:
        """Masked forward for pre-training. Mask ratios default to the config's.

        ``text_logits=False`` skips the text head: training scores only the masked tokens'
        states in :mod:`m3ae.losses` (pass ``text_head=model.text_head`` to the loss).
        """
        cfg = self.config
        self._require_decoder()
        image_mask_ratio = cfg.image_mask_ratio if image_mask_ratio is None else image_mask_ratio
        text_mask_ratio = cfg.text_mask_ratio if text_mask_ratio is None else text_mask_ratio
        enc, patches = self.forward_encoder(
            image, text, text_padding_mask, image_valid, image_mask_ratio=image_mask_ratio,
            text_mask_ratio=text_mask_ratio, generator=generator, image_noise=image_noise,
            text_noise=text_noise)
        h_img, h_txt = self.forward_decoder(enc)
        image_pred = image_mask = logits = text_mask = None
        if enc.image_masking is not None:
            image_pred = self.image_head(h_img)
            image_mask = enc.image_masking.mask
        if enc.text_masking is not None:
            text_mask = enc.text_masking.mask
            logits = self.text_head(h_txt) if text_logits else None
        else:
            h_txt = None
        return M3AEOutput(image_pred, patches, image_mask, logits, text, text_mask, enc.latent, h_txt)

    @torch.no_grad()
    def reconstruct(self, image=None, text=None, text_padding_mask=None, **kw) -> M3AEOutput:
        """A masked forward in eval mode, for pictures and predicted words."""
        was_training = self.training
        self.eval()
        try:
            return self(image, text, text_padding_mask, **kw)
        finally:
            self.train(was_training)

    def forward_features(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                         text_padding_mask: torch.Tensor | None = None,
                         image_valid: torch.Tensor | None = None,
                         return_intermediates: bool = False):
        """Encoder output for full, unmasked inputs: (B, 1 + L_img + T, D), CLS first.

        This is the official ``forward_representation``; take ``[:, 0]`` for the CLS feature.
        """
        enc, _ = self.forward_encoder(image, text, text_padding_mask, image_valid,
                                      return_intermediates=return_intermediates)
        return (enc.latent, enc.intermediates) if return_intermediates else enc.latent

    # ------------------------------------------------------------ pooled features
    def encode_image(self, images: torch.Tensor, pool: str = "cls", blocks=None):
        """Image features (B, emb_dim): the encoder's CLS token (``pool="cls"``) or the mean of
        its patch tokens (``"mean"``), for unmasked normalised images (B, 3, H, W) or (3, H, W).
        The numbers ``m3ae embed --modality image`` writes. ``blocks`` (``"all"`` or a list of
        block indices, None for the final output) gives a list of features, one per layer, from
        the same pass (each block's residual stream, before the final LayerNorm), as timm's
        ``forward_intermediates``."""
        return self.encode(images, None, pool=pool, blocks=blocks)

    def encode_text(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                    pool: str = "cls", blocks=None):
        """Caption features (B, emb_dim) from token ids (B, T) and their padding mask (True =
        padding; the mean leaves padding out): ``model.encode_text(*tokenizer(captions))``.
        ``blocks``: as in :meth:`encode_image`."""
        return self.encode(None, ids, padding_mask, pool, blocks)

    def encode(self, images: torch.Tensor | None, ids: torch.Tensor | None, padding_mask: torch.Tensor | None = None,
               pool: str = "cls", blocks=None):
        """Joint features (B, emb_dim) of images and their captions in one encoder pass (the
        mean runs over the patches and the caption's real tokens); either may be None.
        ``blocks``: as in :meth:`encode_image`."""
        images, ids, padding_mask = check_inputs(images, ids, padding_mask, self.config.in_chans)
        enc, _ = self.forward_encoder(images, ids, padding_mask, return_intermediates=blocks is not None)
        if blocks is None:
            return pool_tokens(enc.latent, enc.key_valid, pool)
        return [pool_tokens(enc.latent if b is None else enc.intermediates[b], enc.key_valid, pool)
                for b in resolve_blocks(blocks, self.config.depth)]

    @torch.no_grad()
    def attention_maps(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                       text_padding_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-layer encoder attention weights (B, heads, N, N) for full, unmasked inputs."""
        inputs = []  # each block's attention input (normalised residual stream, mask), seen in one pass
        hooks = [blk.attn.register_forward_pre_hook(lambda _, args: inputs.append(args))
                 for blk in self.encoder.blocks]
        try:
            self.forward_encoder(image, text, text_padding_mask)
        finally:
            for h in hooks:
                h.remove()
        return [blk.attn(*args, return_attention=True)[1] for blk, args in zip(self.encoder.blocks, inputs)]


def check_inputs(images, ids, padding_mask, in_chans: int = 3):
    """The pooled-feature methods' inputs, checked with one-line errors: unbatched ones get a
    batch dimension; images must be normalised floats, ids integers."""
    if images is not None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            got = type(images).__name__ if not isinstance(images, torch.Tensor) else f"a {images.dtype} tensor"
            raise ValueError(f"images must be normalised float tensors (B, 3, H, W) from the model's "
                             f"transform, got {got}")
        if images.dim() == 3:  # one image from the transform
            images = images[None]
        if images.dim() != 4 or images.shape[1] != in_chans:
            raise ValueError(f"images must be (B, {in_chans}, H, W), got {tuple(images.shape)}")
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise ValueError("ids must be an integer tensor (B, T) from the tokenizer: "
                             "ids, padding_mask = tokenizer(captions)")
        if ids.dim() == 1:
            ids = ids[None]
            padding_mask = None if padding_mask is None else padding_mask.reshape(1, -1)
        if padding_mask is not None and padding_mask.shape != ids.shape:
            raise ValueError(f"padding_mask {tuple(padding_mask.shape)} does not match ids {tuple(ids.shape)}")
        if images is not None and ids.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {ids.shape[0]} captions")
    return images, ids, padding_mask


# Config fields that do not change the weights' shapes or meaning: a pretrained model of a
# preset may differ from it in these.
_TRAINING_ONLY_FIELDS = ("image_mask_ratio", "text_mask_ratio", "text_embed_init_std", "drop_path")


def create_model(preset: str = "base", pretrained=None, **overrides) -> M3AE:
    """Build an M3AE from a named preset (``tiny``, ``small``, ``base``, ``large``, ``huge``;
    see :func:`m3ae.list_models`), with config fields overridden.

    ``pretrained``: a pretrained folder (or a Hub id already in the local cache) whose weights
    to load; its architecture must be the preset's (with ``overrides``), else a ValueError
    names the differences. The model is returned in train mode, as built; for inference use
    :func:`m3ae.load_pretrained`, which also gives the tokenizer and transform.
    """
    cfg = model_config(preset, **overrides)
    if pretrained is None:
        return M3AE(cfg)
    directory = resolve_pretrained(pretrained)
    saved = read_model_config(directory)
    diff = [f"{k}={getattr(saved, k)!r} (preset: {v!r})" for k, v in cfg.__dict__.items()
            if k not in _TRAINING_ONLY_FIELDS and getattr(saved, k) != v]
    if diff:
        raise ValueError(f"{pretrained} is not a {preset!r} model: it has " + ", ".join(diff)
                         + "; pass those as overrides or load it with m3ae.load_pretrained")
    return load_weights(M3AE(cfg), directory)
