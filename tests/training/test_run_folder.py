"""Run folders and interruption (issue 16): no silent restart over an old run, messages for
resume paths, a checkpoint on Ctrl-C, nothing written before the run is known to start."""
from __future__ import annotations

import signal

import pytest
import torch

from m3ae.training import pretrain
from m3ae.training.checkpoint import resolve_resume
from m3ae.training.interrupt import TrainingInterrupted
from m3ae.training.loggers import read_metrics


def _cfg(h, tiny, *extra):
    return h.tiny_config(tiny + ["train.batch_size=4", *extra])


def test_a_new_run_into_an_old_one_is_refused_unless_overwrite(h, tiny, tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg(h, tiny, "train.steps=2", "train.ckpt_every=1"), run, progress=False)
    before = read_metrics(run / "metrics.jsonl")
    with pytest.raises(FileExistsError, match="already holds a run.*--resume latest.*--out.*--overwrite"):
        pretrain(_cfg(h, tiny, "train.steps=1"), run, progress=False)
    assert read_metrics(run / "metrics.jsonl") == before  # untouched
    pretrain(_cfg(h, tiny, "train.steps=1"), run, progress=False, overwrite=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    with pytest.raises(ValueError, match="contradict"):
        pretrain(_cfg(h, tiny, "train.steps=1"), run, progress=False, resume="latest", overwrite=True)


def test_a_folder_left_by_a_failed_start_is_not_a_run(h, tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("preset: tiny\n")
    pretrain(_cfg(h, tiny, "train.steps=1"), run, progress=False)  # not refused


def test_resume_latest_in_an_empty_folder_says_it_starts_fresh(h, tiny, tmp_path, capsys):
    pretrain(_cfg(h, tiny, "train.steps=1"), tmp_path / "new", progress=False, resume="latest")
    out = capsys.readouterr().out
    assert "--resume latest: no checkpoint in" in out and "starting a new run at step 0" in out


def test_resume_paths_that_are_not_checkpoints_say_what_they_are(h, tiny, tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg(h, tiny, "train.steps=1"), run, progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder.*checkpoints/step_N"):
        resolve_resume(str(tmp_path / "nope"), run)
    with pytest.raises(FileNotFoundError, match="holds weights but no trainer_state.pt"):
        resolve_resume(str(run / "final"), run)
    with pytest.raises(FileNotFoundError, match="is a run folder.*step_00000001"):
        resolve_resume(str(run), tmp_path / "other")


def test_ctrl_c_writes_a_checkpoint_at_that_step_and_resume_finishes_the_same(h, tiny, tmp_path, monkeypatch,
                                                                              request):
    from m3ae.training import loggers

    # As in a terminal, whatever started pytest (a background job under nohup ignores SIGINT).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    over = ["train.steps=5", "train.ckpt_every=0"]
    full = pretrain(_cfg(h, tiny, *over), tmp_path / "full", progress=False)
    log = loggers.MetricsLogger.log

    def press_ctrl_c_at_step_3(self, row):
        log(self, row)
        if row["step"] == 3:
            signal.raise_signal(signal.SIGINT)  # the handler only raises a flag: the step completes

    monkeypatch.setattr(loggers.MetricsLogger, "log", press_ctrl_c_at_step_3)
    with pytest.raises(TrainingInterrupted) as e:
        pretrain(_cfg(h, tiny, *over), tmp_path / "cut", progress=False)
    assert e.value.step == 3 and (tmp_path / "cut" / "checkpoints" / "step_00000003").is_dir()
    assert f"m3ae pretrain --out {tmp_path / 'cut'} --resume latest" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.setattr(loggers.MetricsLogger, "log", log)
    pretrain(_cfg(h, tiny, *over), tmp_path / "cut", progress=False, resume="latest")
    a, b = h.weights(tmp_path / "full"), h.weights(tmp_path / "cut")
    h.assert_weights_close(a, b)
    assert full.steps == 5


def test_failed_validation_leaves_no_folder(h, tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="expected a table"):
        pretrain(_cfg(h, tiny, "data.source=table", f"data.urls={tmp_path / 'no.csv'}"), out, progress=False)
    with pytest.raises(ValueError, match="text_len"):
        pretrain(_cfg(h, tiny, "data.text_len=64"), out, progress=False)
    assert not out.exists()


def test_image_only_data_needs_no_tokenizer(tiny, h, tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (40 * i, 80, 120)).save(tmp_path / "imgs" / c / f"{i}.png")
    base = [o for o in tiny if not o.startswith("data.tokenizer=")]
    for tok in ("", "from-data"):  # neither may ask for a tokenizer: no sample has a caption
        cfg = h.tiny_config(base + ["data.source=imagefolder", f"data.urls={tmp_path / 'imgs'}",
                                    f"data.tokenizer={tok}", "train.steps=2", "train.batch_size=4"])
        res = pretrain(cfg, tmp_path / f"run{tok}", progress=False)
        assert res.steps == 2 and all(r["text_loss"] == 0 for r in res.history)


def test_a_model_vocabulary_larger_than_the_tokenizer_is_noted(h, tiny, tmp_path, capsys):
    import re

    pretrain(_cfg(h, tiny, "train.steps=1"), tmp_path / "r", progress=False)  # built-in tokenizer < 256 ids
    out = capsys.readouterr().out
    m = re.search(r"model\.vocab_size=256 but the tokenizer has (\d+) tokens: ids (\d+)\.\.255 are never used", out)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) < 256, out


def test_unknown_ids_show_as_unk_in_reconstruction_captions(tokenizer_file):
    from m3ae.tokenizer import TextTokenizer, load_tokenizer
    from m3ae.visualize import caption_with_predictions

    te = TextTokenizer(load_tokenizer(tokenizer_file), 8)
    ids = torch.tensor(te.ids("a red circle")[:2] + [250])  # 250: beyond the built-in tokenizer
    logits = torch.zeros(3, 256)
    logits[:, 251] = 1.0
    cap = caption_with_predictions(te, ids, torch.zeros(3, dtype=torch.bool), torch.tensor([False, False, True]),
                                   logits)
    # The true id shows as [UNK]; the guess is ranked among words only (as fill_mask ranks), so
    # the model's favourite, an id the tokenizer never produces, is passed over.
    assert "None" not in cap and "[[UNK]→" in cap and not cap.endswith("→[UNK]]")
    logits[:, te.ids("circle")[0]] = 2.0
    assert caption_with_predictions(te, ids, torch.zeros(3, dtype=torch.bool), torch.tensor([False, False, True]),
                                    logits).endswith("[[UNK]→circle]")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error():
    from m3ae.training.distributed import check_device

    with pytest.raises(ValueError, match="no usable CUDA GPU.*use cpu or auto"):
        check_device("cuda")
    with pytest.raises(ValueError, match="not a device name"):
        check_device("gpu")
    assert check_device("cpu") == "cpu"
