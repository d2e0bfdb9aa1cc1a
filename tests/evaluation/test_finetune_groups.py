"""Fine-tuning's parameter groups: pre-training's decay rule, plus layer-wise LR decay."""
from __future__ import annotations

import pytest

from m3ae.config import model_config
from m3ae.evaluation.finetune import Classifier, freeze_and_group
from m3ae.model import M3AE
from m3ae.training import optim


@pytest.mark.parametrize("last_blocks", [None, 1])
def test_finetune_groups_use_the_pretraining_decay_rule(last_blocks):
    depth, decay = 3, 0.5
    model = M3AE(model_config("tiny", image_size=32, patch_size=8, emb_dim=32, depth=depth, num_heads=4,
                              dec_emb_dim=16, dec_depth=1, dec_num_heads=2, vocab_size=100))
    clf = Classifier(model, 4)
    groups = freeze_and_group(clf, lr=0.1, weight_decay=0.05, layer_decay=decay, last_blocks=last_blocks)
    names = {id(p): n for n, p in clf.named_parameters()}
    trained = {names[id(p)] for g in groups for p in g["params"]}
    assert trained == {n for n, p in clf.named_parameters() if p.requires_grad}
    assert not any("decoder" in n or n.startswith(("model.image_head", "model.text_head")) for n in trained)
    first = 0 if last_blocks is None else depth + 1 - last_blocks
    assert {model.group_matcher(n[6:]) for n in trained if n.startswith("model.")} == set(range(first, depth + 2))

    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    plain = optim.param_groups(clf, 0.05)  # the same module, without layer decay
    assert no_decay == {names[id(p)] for p in plain[1]["params"]}
    assert "head.bias" in no_decay and "head.weight" not in no_decay
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            layer = model.group_matcher(n[6:]) if n.startswith("model.") else depth + 1
            assert g["lr_scale"] == decay ** (depth + 1 - layer) and g["lr"] == pytest.approx(0.1 * g["lr_scale"])
