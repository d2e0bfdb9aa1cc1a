"""experiments/compute_curve.py (claim 1 across compute) end to end at smoke size: every run
read out at every milestone it reaches, the layer sweep and OOD where the plan says, the
supervised ceiling's own head, and a second call that finds everything done."""
from __future__ import annotations

import json

import pytest

import compute_curve as cc


def test_the_plan_is_three_seeds_of_each_kind_and_a_supervised_spread():
    runs = {r.name: r.stop for r in cc.plan()}
    assert runs == {**{f"{k}_s{s}": 10400 for k in ("mae", "m3ae") for s in (0, 1, 2)},
                    "supervised_s0": 10400, "supervised_s1": 2600, "supervised_s2": 2600}
    assert cc.STUDY.milestones == (650, 1300, 2600, 5200, 10400) and cc.STUDY.layers_at == (2600, 10400)
    mode = cc.STUDY.mode  # the standard mode's data and evaluation, paper defaults
    assert (mode.model.image_size, mode.model.patch_size, mode.batch_size, mode.classes) == (64, 8, 128, 100)


@pytest.mark.slow
def test_smoke_study_reads_out_every_milestone_and_resumes(shared_data, tmp_path):
    out, pub = tmp_path / "runs", tmp_path / "published"
    args = ["--smoke", "--data", str(shared_data), "--out", str(out), "--publish", str(pub), "--no-progress",
            "--runs", "m3ae_s0", "supervised_s1"]
    assert cc.main([*args, "--until", "4"]) == 0
    assert sorted(p.name for p in (pub / "readouts" / "m3ae_s0").iterdir()) == ["step_1.json", "step_2.json",
                                                                              "step_4.json"]
    assert cc.main(args) == 0  # continues from step 4 to the end
    m3ae = {int(p.stem[5:]): json.loads(p.read_text()) for p in (pub / "readouts" / "m3ae_s0").iterdir()}
    assert sorted(m3ae) == [1, 2, 4, 8, 16]
    for step, r in m3ae.items():
        assert r["step"] == step and set(r["probes"]) >= {"cls", "mean", "cls/fewshot", "mean/fewshot"}
        assert ("layers" in r) == (step in (4, 16))  # a quarter of the steps and the end
        assert ("ood_far" in r) == (step == 16)
        assert 0 <= r["caption_diag"]["with_image"]["accuracy"] <= 1
    assert list(m3ae[16]["layers"]) == ["block 0", "block 1", "block 2", "block 3", "final"]
    sup = {int(p.stem[5:]): json.loads(p.read_text()) for p in (pub / "readouts" / "supervised_s1").iterdir()}
    assert sorted(sup) == [1, 2, 4]  # the spread seeds stop at a quarter
    assert all(r["own_head"]["step"] == s and 0 <= r["own_head"]["top1"] <= 1 for s, r in sup.items())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "readouts").rglob("*.json")}
    assert cc.main(args) == 0  # nothing left: no run trains, no readout is rewritten
    assert {p: p.stat().st_mtime_ns for p in (out / "readouts").rglob("*.json")} == stamps
