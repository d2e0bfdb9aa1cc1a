"""experiments/compute_curve.py (claim 1 across compute) end to end at smoke size: every run
read out at every milestone it reaches, the layer sweep and OOD where the plan says, the
supervised ceiling's own head, and a second call that finds everything done."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import compute_curve as cc


def test_the_plan_is_three_seeds_of_each_kind_and_a_supervised_spread():
    runs = {r.name: r.stop for r in cc.plan()}
    assert runs == {**{f"{k}_s{s}": 10400 for k in ("mae", "m3ae") for s in (0, 1, 2)},
                    "supervised_s0": 10400, "supervised_s1": 2600, "supervised_s2": 2600}
    assert cc.STUDY.milestones == (650, 1300, 2600, 5200, 10400) and cc.STUDY.layers_at == (2600, 10400)
    mode = cc.STUDY.mode  # the standard mode's data and evaluation, paper defaults
    assert (mode.model.image_size, mode.model.patch_size, mode.batch_size, mode.classes) == (64, 8, 128, 100)


def test_a_layer_sweep_reuses_the_probes_encoder_pass(tiny_cfg):
    """``probe_checkpoint(blocks=...)`` gives the plain call's probes bit for bit, and each
    layer's features equal those of a sweep over that layer alone."""
    from m3ae import M3AE
    from reproduction.runs import probe_checkpoint

    model = M3AE(tiny_cfg).eval()
    g = torch.Generator().manual_seed(0)
    s = tiny_cfg.image_size

    def blob(n):
        return {"images": torch.rand(n, 3, s, s, generator=g), "labels": torch.arange(n) % 4,
                "classes": ["a", "b", "c", "d"]}

    sets = {"tin-train": blob(48), "tin-val": blob(24)}
    mode = replace(cc.STUDY.mode, probe_epochs=3, fewshot=2)
    plain, pf = probe_checkpoint(model, sets, mode, seed=1)
    swept, sf = probe_checkpoint(model, sets, mode, seed=1, blocks="all")
    assert "layers" not in pf and list(sf["layers"]) == [0, 1, 2, 3, None]
    assert {k: r.as_dict() for k, r in plain.items()} == {k: r.as_dict() for k, r in swept.items()}
    for split, i in (("train", 0), ("val", 1)):
        for p in ("cls", "mean"):
            np.testing.assert_array_equal(sf[split][p].features, pf[split][p].features)
            np.testing.assert_array_equal(sf["layers"][None][i][p].features, pf[split][p].features)
    _, one = probe_checkpoint(model, sets, mode, seed=1, blocks=[-3])
    assert list(one["layers"]) == [1]
    np.testing.assert_array_equal(one["layers"][1][1]["mean"].features, sf["layers"][1][1]["mean"].features)
    assert not np.array_equal(sf["layers"][1][1]["mean"].features, sf["layers"][2][1]["mean"].features)


def test_ctrl_c_stops_the_study_with_a_message_not_a_traceback(monkeypatch, tmp_path, capsys):
    from m3ae.training.interrupt import TrainingInterrupted

    def interrupted(run, milestone, ctx):
        raise TrainingInterrupted(7, tmp_path / "checkpoints" / "step_00000007", tmp_path)

    monkeypatch.setattr(cc, "prepare", lambda *a: (tmp_path, tmp_path / "tokenizer.json"))
    monkeypatch.setattr(cc, "eval_images", lambda *a: {})
    monkeypatch.setattr(cc, "advance", interrupted)
    assert cc.main(["--smoke", "--out", str(tmp_path / "runs"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 7; checkpoint" in err and err.strip().endswith("run the same command again to continue")
    assert "m3ae pretrain" not in err  # the study's way on is its own command


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
    for p in ("cls", "mean"):  # the final layer is the probe itself
        assert m3ae[16]["layers"]["final"][p] == {k: m3ae[16]["probes"][p][k] for k in ("top1", "knn_top1")}
    sup = {int(p.stem[5:]): json.loads(p.read_text()) for p in (pub / "readouts" / "supervised_s1").iterdir()}
    assert sorted(sup) == [1, 2, 4]  # the spread seeds stop at a quarter
    assert all(r["own_head"]["step"] == s and 0 <= r["own_head"]["top1"] <= 1 for s, r in sup.items())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "readouts").rglob("*.json")}
    assert cc.main(args) == 0  # nothing left: no run trains, no readout is rewritten
    assert {p: p.stat().st_mtime_ns for p in (out / "readouts").rglob("*.json")} == stamps


def _readout(kind: str, seed: int, step: int, top1: float, layers: bool = False) -> dict:
    probe = {"top1": top1, "knn_top1": top1 / 2}
    r = {"run": f"{kind}_s{seed}", "kind": kind, "seed": seed, "step": step,
         "probes": {k: dict(probe) for k in ("cls", "mean", "cls/fewshot", "mean/fewshot")}}
    if layers:
        r["layers"] = {name: {p: dict(probe) for p in ("cls", "mean")} for name in ("block 0", "final")}
    if kind == "m3ae":
        r["caption_diag"] = {"with_image": {"accuracy": 0.9}, "without_image": {"accuracy": 0.6}}
    if kind == "supervised":
        r["own_head"] = {"step": step, "top1": 0.3}
    return r


def test_report_verdicts_and_the_section_in_results_md(tmp_path):
    from reproduction import compute_report

    pub = tmp_path / "pub"
    values = {"mae": (0.10, 0.11, 0.12), "m3ae": (0.20, 0.21, 0.22)}  # clear: gap 10 points, std 1
    for kind, tops in values.items():
        for seed, t in enumerate(tops):
            for step, shift in ((650, 0.0), (2600, 0.0)):
                r = _readout(kind, seed, step, t + shift, layers=step == 2600)
                if step == 650 and kind == "m3ae" and seed == 0:
                    r["probes"]["cls"]["top1"] = 0.115  # below MAE seed 2: overlap at 650, linear CLS
                path = pub / "readouts" / r["run"] / f"step_{step}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(r))
    (pub / "readouts" / "supervised_s0").mkdir()
    (pub / "readouts" / "supervised_s0" / "step_650.json").write_text(json.dumps(_readout("supervised", 0, 650, 0.3)))
    runs = compute_report.load(pub)
    _, made = compute_report.budget_table(runs)
    verdicts = {(s, label): v for s, label, v in made}
    assert len(made) == 2 * 6
    assert verdicts[650, "linear, CLS"] == "inconclusive (seed ranges overlap)"
    assert verdicts[650, "linear, mean"].startswith("reproduced (every seed above; gap 10.00")
    _, layer_made = compute_report.layer_table(runs)
    assert len(layer_made) == 2 and all(v.startswith("reproduced") for *_, v in layer_made)  # block 0 only
    assert "after 2,600 steps, linear probe of the CLS feature: M3AE 21.00 % vs MAE 11.00 %" in \
        compute_report.headline(runs)
    assert compute_report.ood_lines(runs) == ["Not measured yet (at the last step only)."]
    r = _readout("mae", 0, 2600, 0.1)  # one MAE seed's OOD in: shown, marked partial
    r["ood_far"] = r["ood_near"] = {"metrics": {"mahalanobis": {"auroc": 0.615}, "msp": {"auroc": 0.41}}}
    runs["mae"][2600][0] = r
    ood = compute_report.ood_lines(runs)
    assert ood[2] == "| far | mahalanobis | 61.5 | – | (partial: 1 MAE / 0 M3AE seeds) |" and len(ood) == 6
    for kind, auroc in (("mae", (0.40, 0.41, 0.42)), ("m3ae", (0.46, 0.47, 0.48))):  # all seeds in, below 50
        for seed, a in enumerate(auroc):
            r = runs[kind][2600][seed]
            r["ood_far"] = r["ood_near"] = {"metrics": {"mahalanobis": {"auroc": a + 0.2}, "msp": {"auroc": a}}}
    ood = compute_report.ood_lines(runs)
    assert ood[3].endswith("reproduced (every seed above; gap 6.00 = 6.0x seed std); both below chance (AUROC 50) |")
    assert "chance" not in ood[2]  # 66.0 vs 60.0: above chance, no remark

    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "results.md").write_text("# Results\n\nthe reproduction's page\n")
    for _ in range(2):  # a second report replaces the section, never adds one
        compute_report.report(pub, docs)
    text = (docs / "results.md").read_text()
    assert text.startswith("# Results\n\nthe reproduction's page\n") and text.count("## Claim 1 across compute") == 1
    assert "Comparisons made: 14 (12 budget x readout, 2 block x pool;" in text
    assert "clear wins for M3AE" in text and "linear, mean at 650" in text
    assert (docs / "results" / "compute_curve.png").stat().st_size > 0
    # The reproduction's report rewrites its page and keeps the section.
    again = compute_report.carry_section(text, "# Results\n\na new reproduction page\n")
    assert again.count(compute_report.SECTION[0]) == 1 and "a new reproduction page" in again
    assert compute_report.drop_section(again) == "# Results\n\na new reproduction page\n"
    # The pointer: one line before the page's first heading, kept and dropped with the section.
    assert text.count(compute_report.POINTER) == 1 and "M3AE 21.00 % vs MAE 11.00 %" in text.split(compute_report.SECTION[0])[0]
    page = "# Results\n\nintro\n\n## Result in one paragraph\n\nbody\n"
    kept = compute_report.carry_section(text, page)
    assert kept.startswith("# Results\n\nintro\n\n" + compute_report.POINTER) and kept.count(compute_report.POINTER) == 1
    assert kept.index(compute_report.POINTER) < kept.index("## Result in one paragraph") < kept.index(compute_report.SECTION[0])
    assert compute_report.drop_section(kept) == page
