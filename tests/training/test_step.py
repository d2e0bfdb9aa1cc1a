"""The training step: no host synchronisation between log steps, and the non-finite skip
decided on the device."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m3ae.config import build_config
from m3ae.data import build_pretrain_loader, build_text_tokenizer
from m3ae.model import M3AE
from m3ae.training.step import TrainStep

# aten ops that make the host wait for a device: a scalar read, and data-dependent shapes.
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item"}


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values: the aten ops above (item, bool(), int(), float(),
    boolean indexing) plus ``tolist`` and ``cpu``, which bypass the dispatcher on CPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNC_OPS:
            self.calls.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {}
        for name in ("tolist", "cpu"):
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def counted(t, *a, _name=name, _real=real, **kw):
                self.calls.append(_name)
                return _real(t, *a, **kw)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)


def _step_and_batches(overrides, n):
    cfg = build_config("tiny", None, ["model.depth=1", "model.emb_dim=32", "model.num_heads=2",
                                      "model.dec_emb_dim=32", "model.dec_depth=1", "model.dec_num_heads=2",
                                      "model.max_text_len=16", "data.text_len=16", "data.synthetic_size=64",
                                      "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=1",
                                      *overrides])
    text = build_text_tokenizer(cfg.data)
    cfg.model.vocab_size = max(cfg.model.vocab_size, text.vocab_size)
    loader = iter(build_pretrain_loader(cfg.data, cfg.model.image_size, text, cfg.train.batch_size))
    torch.manual_seed(0)
    return TrainStep(M3AE(cfg.model), cfg), [next(loader) for _ in range(n)]


@pytest.mark.parametrize("extra", [[], ["train.accum_steps=2", "train.grad_clip=1.0", "data.paired_fraction=0.5"]])
def test_no_host_reads_between_log_steps(extra):
    step, batches = _step_and_batches(extra, 8)
    accum = step.cfg.train.accum_steps
    reads = HostReads()
    with reads:
        for i in range(3):
            step(i, batches[i * accum:(i + 1) * accum])
    assert reads.calls == []
    with reads:  # the log step reads: the counter sees it
        m = step.metrics()
    assert reads.calls and m["loss"] > 0 and m["skipped_steps"] == 0


def test_a_nonfinite_step_is_skipped_on_the_device():
    step, batches = _step_and_batches([], 3)
    step(0, batches[:1])
    state = {k: v.detach().clone() for k, v in step.model.state_dict().items()}
    opt_steps = [s["step"].clone() for s in step.optimizer.state.values()]
    with torch.no_grad():
        step.model.patch_embed.bias.add_(float("nan"))  # every loss of the next step is NaN
    nan_bias = step.model.patch_embed.bias.detach().clone()
    reads = HostReads()
    with reads:
        step(1, batches[1:2])
    assert reads.calls == []
    assert step.metrics()["skipped_steps"] == 1 and step.in_bad_streak()
    # nothing moved: weights (the poisoned bias included), AdamW's moments and step counts
    for k, v in step.model.state_dict().items():
        expect = nan_bias if k == "patch_embed.bias" else state[k]
        assert torch.equal(v, expect) or (torch.isnan(v).all() and torch.isnan(expect).all()), k
    assert all(torch.equal(s["step"], c) for s, c in zip(step.optimizer.state.values(), opt_steps))
    assert step.longest_bad_streak() == 1 and step.longest_bad_streak() == 1  # still in the streak
    with torch.no_grad():
        step.model.patch_embed.bias.copy_(state["patch_embed.bias"])
    step(2, batches[2:3])
    assert not step.in_bad_streak() and step.metrics()["skipped_steps"] == 1
    assert all(torch.equal(s["step"], c + 1) for s, c in zip(step.optimizer.state.values(), opt_steps))


def test_a_single_process_needs_no_anchor_and_gets_the_same_numbers():
    """One process leaves out LossModule's anchor (0 x one element of each parameter outside
    the blocks) and gives the parameters a batch did not reach a zero gradient instead: the
    same weights and AdamW moments as with the anchor, also after a batch without captions."""
    plain, batches = _step_and_batches([], 2)
    anchored, _ = _step_and_batches([], 2)
    assert not plain.module.anchor
    anchored.module.anchor = True
    no_text = {k: v for k, v in batches[0].items() if k not in ("text", "text_padding_mask")}
    for i, batch in enumerate([batches[0], no_text, batches[1]]):
        plain(i, [batch])
        anchored(i, [batch])
    assert plain.model.text_head.weight.grad is not None
    for (name, v), w in zip(plain.model.state_dict().items(), anchored.model.state_dict().values()):
        assert torch.equal(v, w), name
    for p, q in zip(plain.optimizer.state.values(), anchored.optimizer.state.values()):
        assert all(torch.equal(p[k], q[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_nonfinite_parameters_finds_nan_and_both_infinities():
    from m3ae.training.distributed import DistInfo
    from m3ae.training.nonfinite import nonfinite_parameters

    info = DistInfo(device=torch.device("cpu"))
    params = [torch.zeros(3), torch.ones(2, 2), torch.empty(0), torch.full((5,), 2.0), torch.ones(4)]
    assert nonfinite_parameters(params, info).item() == 0
    params[0][1], params[1][0, 1], params[3][4] = float("nan"), float("inf"), float("-inf")
    assert nonfinite_parameters(params, info).item() == 3


def test_keeping_freed_memory_is_a_config_switch(monkeypatch):
    import platform

    from m3ae.training import step as step_module

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert step_module.keep_freed_memory() is True
    calls = []
    monkeypatch.setattr(step_module, "keep_freed_memory", lambda: calls.append(1) or True)
    _step_and_batches(["train.keep_freed_memory=false"], 0)
    assert calls == []
    _step_and_batches([], 0)
    assert calls == [1]
