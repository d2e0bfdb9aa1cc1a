"""m3ae info: architecture, parameter counts per part, provenance, encoder-only."""
from __future__ import annotations

import json

import m3ae
from m3ae.cli import main
from m3ae.config import build_config


def _run_folder(tmp_path, **overrides):
    run = tmp_path / "run"
    cfg = build_config("tiny", overrides=[f"model.{k}={v}" for k, v in overrides.items()])
    run.mkdir()
    cfg.save(run / "config.yaml")
    model = m3ae.M3AE(cfg.model)
    model.save_pretrained(run / "final")
    rows = [{"step": 10, "loss": 1.0, "data/seen": 640}, {"step": 20, "loss": 0.5, "data/seen": 1280}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, model


def test_info_of_a_run(tmp_path, capsys):
    run, model = _run_folder(tmp_path, emb_dim=64, depth=2)
    assert main(["info", str(run), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    p = facts["params"]
    assert sum(p.values()) == sum(x.numel() for x in model.parameters())
    assert p["encoder"] == sum(x.numel() for n, x in model.named_parameters() if n.startswith("encoder."))
    assert p["heads"] == sum(x.numel() for n, x in model.named_parameters() if n.startswith(("image_head", "text_head")))
    assert facts["step"] == 20 and facts["samples_seen"] == 1280 and facts["preset"] == "tiny"
    assert facts["preset_differences"] == ["emb_dim=64 (preset 128)", "depth=2 (preset 4)"]
    assert main(["info", str(run / "final")]) == 0
    out = capsys.readouterr().out
    assert "M3AE (encoder + decoder)" in out and "step 20, 1,280 samples seen" in out
    assert "image:      32 px, patch 4 (8x8 = 64 patches)" in out


def test_info_of_an_encoder_only_model(tmp_path, capsys):
    m3ae.create_model("tiny", encoder_only=True).save_pretrained(tmp_path / "enc")
    assert main(["info", str(tmp_path / "enc")]) == 0
    out = capsys.readouterr().out
    assert "encoder only" in out and "  decoder:" not in out
    assert "parameters: 931,072 (embeddings 137,728, encoder 793,344)" in out


def test_info_of_a_missing_path_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
