"""Evaluation outputs that explain themselves (issue 16): baselines and both poolings, no
top-k that is 100% by construction, messages while probing and on cache hits, titles that
name the data, a colour bar, a sensible default word, zero-shot warnings and a picture."""
import io
import json
import tarfile

import pytest

from m3ae.cli import main

Q = ["--no-progress", "--device", "cpu"]


def test_linear_probe_reports_both_poolings_and_baselines(tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["linear-probe", str(tiny_model_dir), "--train", "shapes:120:0", "--val", "shapes:60:1", "--epochs", "5",
            "--cache-dir", str(cache), "--out", str(tmp_path / "p"), "--baselines", "pixels,random-init", *Q]
    assert main(args) == 0
    out = capsys.readouterr().out
    for line in ("cls pooling", "mean pooling", "raw pixels (8x8)", "random init (cls)", "chance"):
        assert line in out, out
    assert "top-5" not in out  # 4 classes
    assert "linear probe (5 epochs on 120 x 32 features) and kNN (k=20)" in out  # the probe phase is announced
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert set(res["by_pool"]) == {"cls", "mean"} and res["top1"] == res["by_pool"]["cls"]["top1"]
    assert res["baselines"]["chance"] == pytest.approx(0.25)
    assert 0 <= res["baselines"]["raw pixels (8x8)"]["top1"] <= 1 and "random init (cls)" in res["baselines"]
    assert res["by_pool"]["cls"]["top1"] != res["by_pool"]["mean"]["top1"] or \
        res["by_pool"]["cls"]["knn_top1"] != res["by_pool"]["mean"]["knn_top1"]
    assert main(args) == 0
    assert "read from the cache" in capsys.readouterr().out  # a cache hit is not silent


def test_finetune_hides_top5_with_four_classes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_model_dir), "--train", "shapes:32:0", "--val", "shapes:16:1", "--out", str(out),
                 "--epochs", "1", "--batch-size", "16", *Q]) == 0
    printed = capsys.readouterr().out
    assert "top-5" not in printed and "chance 25.00%" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["top5"] is None and res["chance"] == pytest.approx(0.25)


def test_data_names_for_titles_and_shard_totals_for_progress_bars(tmp_path):
    from m3ae.evaluation.data import data_name, load_labelled
    from m3ae.evaluation.features import _approx_len

    assert data_name("../shared/data/cifar10/test-*.tar.gz") == "cifar10/test"
    assert data_name("data/in/val-{000000..000009}.tar") == "in/val"
    assert data_name("shapes:500:1") == "shapes"
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    for shard in ("s-0.tar", "s-1.tar"):
        with tarfile.open(tmp_path / shard, "w") as tar:
            for i in range(3):
                for ext, data in (("png", buf.getvalue()), ("cls", b"1")):
                    info = tarfile.TarInfo(f"{shard[:3]}{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    data = load_labelled(str(tmp_path / "s-{0..1}.tar"), 8)
    assert _approx_len(data.dataset) == 6  # 3 samples in the first shard x 2 shards


def _capture_figures(monkeypatch, module):
    figs = []

    def keep(fig, path, dpi=120):
        figs.append(fig)
        return path
    monkeypatch.setattr(module, "save_figure", keep)
    return figs


def test_roc_and_tsne_titles_name_the_data(tiny_model_dir, tmp_path, monkeypatch):
    import m3ae.evaluation.ood as ood
    import m3ae.evaluation.tsne as tsne

    roc, ts = _capture_figures(monkeypatch, ood), _capture_figures(monkeypatch, tsne)
    assert main(["ood", str(tiny_model_dir), "--id-train", "shapes:60:0", "--id-test", "shapes:30:1",
                 "--ood", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *Q]) == 2  # bad --ood: no figure
    assert main(["ood", str(tiny_model_dir), "--id-train", "shapes:60:0", "--id-test", "shapes:30:1", "--ood",
                 "shapes:30:2", "--out", str(tmp_path / "o"), "--probe-epochs", "2", "--cache-dir",
                 str(tmp_path / "c"), *Q]) == 0
    assert roc[0].axes[0].get_title() == "in: shapes  vs  OOD: shapes"
    assert main(["visualize", str(tiny_model_dir), "--data", "shapes:30:1", "--out", str(tmp_path / "v"),
                 "--what", "tsne", "--tsne-samples", "30", *Q]) == 0
    assert "shapes, 30 samples" in ts[0]._suptitle.get_text()


def test_attention_map_has_a_colour_bar_and_a_content_word(tiny_model, monkeypatch):
    import m3ae.evaluation.attention as attention
    from m3ae.evaluation import load_labelled, make_loader
    from m3ae.evaluation.attention import last_content_word

    assert last_content_word(["a", "red", "circle", "on", "the", "left", "."]) == 5
    assert last_content_word(["a", "big", "ele", "##phant", "."]) == 2
    assert last_content_word(["the", "."]) is None
    model, te = tiny_model
    figs = _capture_figures(monkeypatch, attention)
    batch = next(iter(make_loader(load_labelled("shapes:2:1", 32), te, 2)))
    attention.save_attention_figure(model, te, batch, "unused.png", n=2)
    fig = figs[0]
    assert len(fig.axes) == 2 * 3 + 2  # three panels per row plus one colour bar per heat map
    titles = [ax.get_title() for ax in fig.axes]
    assert not any(t.startswith("'.'") for t in titles)


def test_zero_shot_warns_about_unknown_class_names_and_draws_a_picture(tiny_model_dir, tmp_path, capsys):
    assert main(["zero-shot", str(tiny_model_dir), "--data", "shapes:10:1", "--classes",
                 "circle,square,triangle,cross,qzxv", "--out", str(tmp_path), *Q]) == 0
    err = capsys.readouterr().err
    assert "'qzxv'" in err and ("[UNK]" in err or "letter pieces" in err)
    assert "'circle'" not in err
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    res = json.loads((tmp_path / "results.json").read_text())
    assert sum(map(sum, res["confusion"])) == 10 and len(res["warnings"]) == 1
