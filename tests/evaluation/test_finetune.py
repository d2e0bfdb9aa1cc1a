"""m3ae.evaluation.finetune: parameter groups (pre-training's decay rule plus layer-wise LR
decay) and the official recipe's regularisers: Mixup/CutMix targets, drop path,
RandAugment, and the CLI flags that turn them on and off."""
from __future__ import annotations

import pytest
import torch

from m3ae.config import model_config
from m3ae.evaluation.data import RandAugmented, load_labelled
from m3ae.evaluation.finetune import Classifier, batch_mixer, freeze_and_group
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


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_are_probabilities_that_mix_two_classes(mixup, cutmix):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, target = batch_mixer(4, mixup, cutmix)(images, labels)
    assert target.shape == (8, 4)
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert (target.max(1).values < 1).all()  # every row mixes its class with the batch's roll
    assert not torch.equal(mixed, images)
    if mixup == 0:  # CutMix pastes a box: each pixel is one sample's or the other's
        rolled = images.roll(1, 0)
        assert ((mixed == images) | (mixed == rolled)).all()


def test_no_mixing_when_both_alphas_are_zero():
    assert batch_mixer(4, 0.0, 0.0) is None
    with pytest.raises(ValueError, match="switch_prob"):
        batch_mixer(4, 0.8, 1.0, switch_prob=2)


def test_switch_prob_picks_cutmix_or_mixup():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    mixer = batch_mixer(4, 0.8, 1.0, switch_prob=1.0)  # always CutMix
    for _ in range(5):
        mixed, _ = mixer(images, labels)
        assert ((mixed == images) | (mixed == images.roll(1, 0))).all()


def test_randaug_changes_the_training_pixels_only():
    plain = load_labelled("shapes:4", 32, train=True)
    aug = load_labelled("shapes:4", 32, train=True, randaug=(2, 9))
    torch.manual_seed(0)
    a = torch.stack([plain.dataset[i]["image"] for i in range(4)])
    torch.manual_seed(0)
    b = torch.stack([aug.dataset[i]["image"] for i in range(4)])
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert aug.fingerprint != plain.fingerprint  # feature caches never mix the two
    ev = load_labelled("shapes:4", 32, randaug=(2, 9))  # evaluation: no augmentation at all
    torch.testing.assert_close(ev.dataset[0]["image"], load_labelled("shapes:4", 32).dataset[0]["image"])


def test_finetune_sets_drop_path_and_reads_the_flags(tiny_model_dir, tmp_path):
    import json

    from m3ae.cli import main
    from m3ae.cli.finetune import _randaug

    assert _randaug("2,9") == (2, 9) and _randaug("0") is None
    with pytest.raises(ValueError, match="N,M"):
        _randaug("nine")
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_model_dir), "--train", "shapes:32:0", "--val", "shapes:16:1", "--out", str(out),
                 "--epochs", "1", "--batch-size", "16", "--drop-path", "0.2", "--mixup", "0", "--randaug", "1,5",
                 "--no-progress"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["drop_path"], settings["mixup"], settings["cutmix"], settings["randaug"]) == (0.2, 0.0, 1.0, "1,5")


def test_finetune_applies_drop_path_to_the_encoder(tiny_model):
    from m3ae.evaluation.data import make_loader
    from m3ae.evaluation.finetune import finetune

    model, _ = tiny_model
    import copy

    model = copy.deepcopy(model)
    train = make_loader(load_labelled("shapes:16:0", 32, train=True), batch_size=8)
    res = finetune(model, train, make_loader(load_labelled("shapes:8:1", 32), batch_size=8), 4, epochs=1,
                   drop_path=0.3, progress=False)
    rates = [b.drop_path.p for b in res.classifier.model.encoder.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3)
