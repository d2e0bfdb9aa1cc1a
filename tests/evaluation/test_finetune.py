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
from m3ae import optim


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


def _image_folder(root, n_per_class: int = 6):
    """A labelled image folder (two colours, noisy): indexable, so fine-tuning can resume."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            noise = torch.randint(-40, 40, (32, 32, 3), generator=g)
            pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return str(root)


def _run(model, folder, run_dir=None, **kw):
    import copy

    from m3ae.evaluation.data import make_loader
    from m3ae.evaluation.finetune import finetune

    train = make_loader(load_labelled(folder, 32, train=True, crop_scale=(0.2, 1.0)), batch_size=4, shuffle=True,
                        seed=3)
    val = make_loader(load_labelled(folder, 32), batch_size=6)
    return finetune(copy.deepcopy(model), train, val, 2, steps=7, warmup_steps=2, lr=1e-3, layer_decay=1.0,
                    mixup=0, cutmix=0, drop_path=0.1, label_smoothing=0, progress=False, run_dir=run_dir, **kw)


def test_finetune_by_steps_resumes_exactly_and_saves_each_milestone(tiny_model, tmp_path):
    from m3ae import load_pretrained

    model, _ = tiny_model
    folder = _image_folder(tmp_path / "data")
    whole = _run(model, folder, tmp_path / "whole", save_at=(3, 6), ckpt_every=2)
    # Stopped at step 4 (mid-epoch: 3 batches an epoch), then continued by a fresh call and model.
    _run(model, folder, tmp_path / "split", save_at=(3, 6), ckpt_every=2, max_steps=4)
    assert json_steps(tmp_path / "split") == 4
    resumed = _run(model, folder, tmp_path / "split", save_at=(3, 6), ckpt_every=2)
    for (name, a), b in zip(whole.classifier.state_dict().items(), resumed.classifier.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h.get("step") for h in whole.history] == [3, 6, 7] and whole.history == resumed.history
    for step in (3, 6):  # each milestone's encoder is a model folder of its own
        saved = load_pretrained(tmp_path / "whole" / f"step_{step}", need_tokenizer=False)[0]
        assert saved.config == model.config
    final = load_pretrained(tmp_path / "whole" / "step_6", need_tokenizer=False)[0]
    assert not torch.equal(final.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


def json_steps(run_dir) -> int:
    return torch.load(run_dir / "state", weights_only=False)["step"]


def test_a_resumable_finetune_needs_indexable_data(tiny_model, tmp_path):
    from m3ae.evaluation.data import make_loader
    from m3ae.evaluation.finetune import finetune

    model, _ = tiny_model
    shapes = make_loader(load_labelled("shapes:8:0", 32, train=True), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="indexable"):
        finetune(model, shapes, shapes, 4, steps=2, run_dir=tmp_path / "r", progress=False)


def test_finetune_random_init_trains_the_architecture_from_scratch(tiny_model_dir, tmp_path):
    import json

    from m3ae.cli import main
    from m3ae import load_pretrained
    from m3ae.evaluation.finetune import Classifier

    folder = _image_folder(tmp_path / "data")
    out = tmp_path / "sup"
    assert main(["finetune", str(tiny_model_dir), "--random-init", "--train", folder, "--val", folder, "--out",
                 str(out), "--steps", "4", "--save-at", "2", "--mixup", "0", "--cutmix", "0", "--randaug", "0",
                 "--batch-size", "4", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["trained"] == "all blocks from random weights"
    assert [h["step"] for h in res["history"]] == [2, 4]
    pre = load_pretrained(tiny_model_dir, need_tokenizer=False)[0]
    saved = load_pretrained(out / "step_2", need_tokenizer=False)[0]
    # The encoder trained away from its start; the decoder (never trained) is the seeded random
    # init (--seed 0), not the pre-trained decoder.
    torch.manual_seed(0)
    init = M3AE(pre.config)
    assert torch.equal(saved.image_head.weight, init.image_head.weight)
    assert not torch.allclose(saved.image_head.weight, pre.image_head.weight)
    assert not torch.equal(Classifier.load(out).model.cls_token, init.cls_token)
