"""A small pretrained folder for the public API's tests: a tiny M3AE (random weights, fixed
seed) with the built-in shapes' closed vocabulary as its tokenizer. No training: these
tests check that the API computes what the lower layers compute, number for number."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def api_model_dir(tmp_path_factory):
    from m3ae.config import model_config
    from m3ae.data.synthetic import vocabulary
    from m3ae.model import M3AE
    from m3ae.tokenizer import SPECIAL_TOKENS, from_vocab

    tok = from_vocab(SPECIAL_TOKENS + vocabulary())
    torch.manual_seed(0)
    model = M3AE(model_config("tiny", emb_dim=32, depth=2, num_heads=2, dec_emb_dim=32, dec_depth=1,
                              dec_num_heads=2, vocab_size=tok.get_vocab_size(), max_text_len=24))
    return model.save_pretrained(tmp_path_factory.mktemp("api") / "final", tok)
