"""Pretrained folders: round trip, clear key/shape messages, the local Hub cache, push_to_hub."""
from __future__ import annotations

import os

import pytest
import torch

from m3ae import M3AE
from m3ae.pretrained import CONFIG_NAME, WEIGHTS_NAME, load_state_dict_checked


@pytest.fixture
def small(tiny_cfg):
    return M3AE(tiny_cfg).eval()


def test_round_trip_same_outputs(small, tmp_path, batch_factory):
    small.save_pretrained(tmp_path / "m")
    loaded = M3AE.from_pretrained(tmp_path / "m")
    assert loaded.config == small.config
    image, text, pad = batch_factory(small.config, b=2, t=8)
    with torch.no_grad():
        a = small.forward_features(image, text, pad)
        b = loaded.forward_features(image, text, pad)
    assert torch.equal(a, b)


def test_missing_unexpected_and_shape_messages(small):
    state = small.state_dict()
    state.pop("cls_token")
    state["extra.weight"] = torch.zeros(1)
    state["patch_embed.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_state_dict_checked(small, state)
    msg = str(e.value)
    assert "missing keys: ['cls_token']" in msg
    assert "unexpected keys: ['extra.weight']" in msg
    assert "patch_embed.bias: checkpoint (3,) vs model (128,)" in msg


def test_non_strict_loads_the_rest(small):
    before = small.cls_token.detach().clone()
    state = {k: torch.full_like(v, 0.5) for k, v in small.state_dict().items() if k != "cls_token"}
    load_state_dict_checked(small, state, strict=False)
    assert torch.equal(small.cls_token, before)
    assert (small.patch_embed.weight == 0.5).all()


def _fake_hub_cache(root, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay ``folder`` out as huggingface_hub's cache does, as if downloaded earlier."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_from_pretrained_hub_id_in_local_cache(small, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as c

    small.save_pretrained(tmp_path / "src")
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "someone/m3ae-tiny", tmp_path / "src")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = M3AE.from_pretrained("someone/m3ae-tiny")
    assert torch.equal(loaded.cls_token, small.cls_token)
    assert (snap / CONFIG_NAME).is_file()


def test_unknown_name_says_no_download(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="never downloads.*huggingface-cli download someone/absent"):
        M3AE.from_pretrained("someone/absent")
    with pytest.raises(FileNotFoundError, match="neither a pretrained folder"):
        M3AE.from_pretrained(tmp_path / "no" / "such" / "dir")


def test_push_to_hub_uploads_the_folder_layout(small, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    calls = {}

    class FakeApi:  # no network: record what would be uploaded
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, **kw):
            calls["files"] = sorted(os.listdir(folder_path))
            calls["reloaded"] = M3AE.from_pretrained(folder_path)
            return "https://example.invalid/commit/1"

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    url = small.push_to_hub("someone/m3ae-tiny")
    assert url.endswith("/commit/1") and calls["repo"] == "someone/m3ae-tiny"
    assert calls["files"] == [CONFIG_NAME, WEIGHTS_NAME]
    assert torch.equal(calls["reloaded"].cls_token, small.cls_token)
