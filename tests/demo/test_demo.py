"""`m3ae demo` on a tiny configuration: the summary's numbers come from the run, a finished run
re-prints its summary without training, an interrupted run continues from its checkpoint."""
import copy
import json
import re

import pytest

import m3ae.demo as demo
from m3ae.training.loggers import MetricsLogger

TINY = ["model.emb_dim=32", "model.depth=1", "model.dec_emb_dim=32", "model.dec_depth=1", "train.batch_size=8",
        "data.synthetic_size=64", "train.log_every=1", "train.recon_every=0", "train.ckpt_every=2", "train.steps=4"]


def run(out, messages, overrides=()):
    return demo.run_demo(out, TINY + list(overrides), eval_samples=24, progress=False, probe_sizes=(48, 24),
                         say=messages.append)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    messages = []
    run(out, messages)
    return out, messages


def _allowed_numbers(s: dict) -> set[str]:
    """Every way render_summary may print a number of summary.json."""
    out = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.update({f"{100 * v:.1f}", f"{v:.3f}", f"{v / 60:.1f}", f"{v / 1e6:.2f}", f"{100 * v:.0f}",
                        str(v), str(round(1 / v)) if 0 < v < 1 else ""})
    walk({k: v for k, v in s.items() if k != "config"})
    for task in demo.PROBE_TASKS:  # the gaps render_summary states between probe results
        q = s["probe"][task]
        out.update(f"{100 * abs(q['trained'] - q[other]):.1f}" for other in ("random_init", "pixels"))
    return out


@pytest.mark.slow
def test_every_number_of_the_summary_comes_from_summary_json(finished):
    out, messages = finished
    s = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    assert md == demo.render_summary(s)  # the text is a function of the measured numbers only
    allowed = _allowed_numbers(s)
    body = [line for line in md.splitlines() if not line.startswith("#")]
    numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?", "\n".join(body))
    assert numbers and all(n in allowed for n in numbers), [n for n in numbers if n not in allowed]
    # Spot checks, sentence by sentence.
    w, r, p = s["words"], s["reconstruction"], s["probe"]
    assert f"colour words: {demo.pct(w['image']['colour'])} with the image" in md
    assert f"{demo.pct(w['no_image']['shape'])} with the image removed" in md
    assert f"1 in 6 = {demo.pct(w['chance']['colour'])}" in md and w["chance"]["shape"] == 0.25
    assert f"caption's colour {demo.pct(r['fully_hidden']['caption'])}" in md
    for task, q in ((t, p[t]) for t in demo.PROBE_TASKS):
        assert f"| {task} ({q['classes']} classes) | {demo.pct(q['trained'])} | {demo.pct(q['random_init'])} | " \
               f"{demo.pct(q['pixels'])} | {demo.pct(q['chance'])} |" in md
    assert f"for {s['training']['steps']} steps" in md and s["training"]["steps"] == 4
    assert s["training"]["sessions"] == 1 and s["training"]["seconds"] > 0
    assert (out / "cross_modal.png").is_file() and (out / "reconstructions.png").is_file()
    assert any("progress bar: loss =" in m for m in messages)
    assert any("m3ae linear-probe" in m and str(out / "final") in m for m in messages)


def test_wording_follows_the_numbers():
    s = {"training": dict(steps=1, batch_size=1, seconds=60, threads=2, sessions=1, final_loss=1.0),
         "model": dict(parameters=10**6, image_mask_ratio=0.5, text_mask_ratio=0.5, quarter_mask_fraction=0.25),
         "words": {"samples": 10, "count": {"colour": 5, "shape": 5, "all": 20},
                   "chance": {"colour": 1 / 6, "shape": 0.25},
                   "image": {"colour": 0.9, "shape": 0.4, "all": 0.8},
                   "full_image": {"colour": 0.9, "shape": 0.4, "all": 0.8},
                   "no_image": {"colour": 0.01, "shape": 0.26, "all": 0.5}},
         "reconstruction": {"partly_hidden": {"caption": 0.9, "no_caption": 0.8, "n": 10},
                            "fully_hidden": {"caption": 0.7, "swapped": 0.6, "no_caption": 0.1, "n": 5}},
         "probe": {"colour": dict(trained=0.95, random_init=0.8, pixels=0.96, chance=1 / 6, classes=6),
                   "shape": dict(trained=0.5, random_init=0.6, pixels=0.3, chance=0.25, classes=4),
                   "n_train": 10, "n_test": 5}}
    md = demo.render_summary(s)
    assert "in 25% of each batch the hidden patches include one whole quarter of the image" in md
    assert "90.0 % with the image (far above chance" in md and "1.0 % with the image removed (below chance)" in md
    assert "40.0 % with the image (above chance" in md and "26.0 % with the image removed (near chance)" in md
    assert "- shape: the trained encoder is 10.0 points below its initialisation and 20.0 points above raw pixels" in md
    assert "- colour: the trained encoder is 15.0 points above its initialisation and level with raw pixels" in md
    assert "| colour (6 classes) | 95.0 % | 80.0 % | 96.0 % | 16.7 % |" in md
    t = copy.deepcopy(s)
    t["probe"]["shape"]["trained"] = 0.605
    t["model"]["quarter_mask_fraction"] = 0.0
    assert "level with its initialisation" in demo.render_summary(t) and "quarter" not in demo.render_summary(t)


@pytest.mark.slow
def test_rerunning_a_finished_run_reprints_it_without_training(finished, monkeypatch):
    out, _ = finished
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    md = (out / "summary.md").read_text()

    def no_training(*a, **k):
        raise AssertionError("a finished demo must not train again")
    monkeypatch.setattr(demo, "pretrain", no_training)
    messages = []
    s = run(out, messages)
    assert s["rerun"] and md in messages and any("finished demo run" in m for m in messages)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten
    with pytest.raises(ValueError, match="different configuration.*train.steps"):
        run(out, [], ["train.steps=6"])


def interrupt_at(step, out, monkeypatch):
    """Run the tiny demo into ``out`` with Ctrl-C raised while step ``step`` is logged."""
    log = MetricsLogger.log

    def ctrl_c(self, row):
        if row.get("step") == step:
            raise KeyboardInterrupt
        log(self, row)
    monkeypatch.setattr(MetricsLogger, "log", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run(out, [])
    monkeypatch.setattr(MetricsLogger, "log", log)


@pytest.mark.slow
def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    interrupt_at(3, tmp_path, monkeypatch)  # during step 3: the last checkpoint is step 2
    assert not (tmp_path / "summary.json").exists()
    messages = []
    s = run(tmp_path, messages)
    assert any("continuing the interrupted demo run" in m and "step 2 of 4" in m for m in messages)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert s["training"]["sessions"] == 2 and not s["rerun"]
    assert "in 2 session(s)" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_a_run_stopped_before_its_first_checkpoint_starts_afresh_quietly(tmp_path, monkeypatch, capsys):
    interrupt_at(1, tmp_path, monkeypatch)  # before the first checkpoint (step 2): nothing to continue
    capsys.readouterr()
    messages = []
    s = run(tmp_path, messages)
    printed = capsys.readouterr().out + "\n".join(messages)
    # A new run, not a failed resume: no trainer message about a missing checkpoint, and the
    # metrics of the stopped start are replaced, not appended to.
    assert "no checkpoint" not in printed and "continuing" not in printed
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert s["training"]["sessions"] == 1
