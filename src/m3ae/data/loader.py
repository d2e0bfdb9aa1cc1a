"""From sources to batches: per-rank samplers, streams and mixtures, skip accounting, resume.

Two kinds of source reach the loader:

* **Indexable** (built-in shapes, HDF5, tables, image folders, text files): an
  :class:`EpochSampler` draws one permutation per epoch from ``(seed, epoch)``; rank ``r`` of
  ``R`` takes every ``R``-th index of it and the DataLoader deals those out to its workers, so
  every sample is read exactly once per epoch across ranks x workers. (For training on
  several ranks the ``N mod R`` leftover indices of each epoch's permutation are dropped so
  that every rank runs the same number of steps; they differ from epoch to epoch.)
* **Streams** (WebDataset shards, and any mixture): a :class:`StreamDataset` in each worker
  reads the raw item stream of its reader slot (rank x worker) and decodes it.

**Resume protocol.** The loader is a :class:`PretrainLoader`; ``loader.state_dict()`` /
``loader.load_state_dict(state)`` save and restore the exact position for both kinds (and the
skip counts). For an indexable source ``loader.sampler.set_position(epoch, start)`` (``start``
= samples this rank has consumed in the epoch) keeps working as before. For a stream the state
holds, per worker, how many raw items it has handed out; on resume each worker replays its
stream (shard order, shuffle buffer and mixture draws are functions of the seed, epoch and
slot) and skips that many items *without decoding them*, then continues — nothing is repeated
or skipped. It also holds which worker's batch was due next: workers take turns, and the
resumed DataLoader's worker ``w`` plays reader ``w + next`` so that the turns continue where
they stopped. The resumed run must use the same ``num_workers`` (checked); on another world
size the interrupted epoch starts afresh with a note (reader slots do not map onto other
slots), while an indexable position converts (``offset``, see :class:`EpochSampler`): both
in :func:`resume_position`, which the trainer calls. The replay costs reading, not decoding,
the skipped items; for an endless stream (a mixture or ``resample=true``) it grows with the
run length.

**Bad samples.** A sample that raises :class:`~m3ae.data.decode.BadSample` becomes a marker
that the :class:`~m3ae.data.collate.Collator` drops; the batch carries the events
(``batch["data_events"]``) back from the worker process and the loader adds them to
``loader.skips`` (a :class:`~m3ae.data.decode.SkipCounter`), which raises once more than
``data.max_skip_fraction`` of the samples were skipped. A batch whose samples were all bad is
not yielded. A damaged shard becomes one marker too (it keeps the stream positions right for
resume), counted as a damaged shard but not as a sample read or skipped.
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..config import MixtureMode, check_choice
from .decode import BadSample, DataError, SkipCounter


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else the initialised process group's, else (0, 1). Not the
    launcher's RANK/WORLD_SIZE (see :func:`m3ae.training.distributed.env_rank_info`): a process
    that joined no group (an evaluation started by torchrun) reads all the data itself."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def keeps_caption(key: str, paired_fraction: float) -> bool:
    """Deterministic per key: True for about ``paired_fraction`` of all keys.

    A hash of the key (not of the position or the epoch), so a pair that lost its caption
    loses it in every epoch, on every rank and after a resume — the paper's experiment
    trains on a fixed subset of pairs."""
    if paired_fraction >= 1.0:
        return True
    return (zlib.crc32(key.encode("utf-8")) % 10_000) < paired_fraction * 10_000


def process(read: Callable, item, fn: Callable | None, seed: int | None = None) -> dict:
    """``fn(read(item))`` with torch's CPU generator seeded by ``seed``; a :class:`BadSample`
    becomes a skip marker. The random augmentation of a sample is thus a function of its seed
    alone, the same whatever the worker count and after a resume."""
    def run():
        try:
            sample = read(item)
        except BadSample as e:
            if not e.sample:  # a damaged shard: counted, but it is not a sample read
                return {"key": e.key, "_skip": e.reason, "_marker": True, "_events": [("shard", e.reason, e.key)]}
            return {"key": e.key, "_skip": e.reason, "_events": [("skip", e.reason, e.key)]}
        return fn(sample) if fn is not None else sample

    if seed is None:
        return run()
    with torch.random.fork_rng(devices=[]):
        # CPU generator only: torch.manual_seed would also queue CUDA seeding (slow).
        torch.default_generator.manual_seed(seed)
        return run()


class MapDataset(Dataset):
    """An indexable source with its transform. Indexed by ``(index, seed)`` from
    :class:`EpochSampler`, or by a plain index (then unseeded)."""

    def __init__(self, base: Dataset, fn: Callable | None):
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        if isinstance(i, tuple):
            i, seed = i
            return process(self.base.__getitem__, i, self.fn, seed)
        return process(self.base.__getitem__, i, self.fn)


class EpochSampler(Sampler):
    """A fresh random order each epoch, drawn from ``(seed, epoch)``, split over ranks, that
    can start mid-epoch.

    Yields ``(index, augmentation seed)`` pairs. All ranks draw the same permutation; rank
    ``r`` of ``world_size`` takes positions ``r, r + world_size, ...``. With ``even`` each rank
    takes ``size // world_size`` of them, so all ranks run the same number of steps.
    ``set_position(epoch, start)`` restarts at sample ``start`` of this rank's share.
    ``offset`` > 0 (a run resumed on another number of ranks) leaves out the first ``offset``
    samples of the epoch's order, which the ranks before the resume read, and splits the rest;
    it holds for that epoch only.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, even: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch, self.start, self.offset = 0, 0, 0

    def set_position(self, epoch: int, start: int = 0, offset: int = 0) -> None:
        self.epoch, self.start, self.offset = epoch, start, offset

    def _share(self) -> int:
        left = max(self.size - self.offset, 0)
        if self.even:
            return left // self.world_size
        return len(range(self.rank, left, self.world_size))

    def __len__(self) -> int:
        return max(self._share() - self.start, 0)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        aug = torch.randint(0, 2**62, (self.size,), generator=g)
        return order[self.offset:][self.rank::self.world_size][: self._share()][self.start:], aug

    def indices(self) -> torch.Tensor:
        """This rank's remaining indices of the epoch, in order (what iterating yields, without
        the augmentation seeds)."""
        return self._draw()[0]

    def __iter__(self):
        mine, aug = self._draw()
        for i in mine.tolist():
            yield i, int(aug[i])


class IndexedStream:
    """An indexable source as a stream of indices for a reader slot (used inside mixtures):
    per epoch a permutation from ``(seed, epoch)``, slot ``s`` of ``n`` takes every n-th index."""

    def __init__(self, source: Dataset, shuffle: bool = True):
        self.source, self.shuffle = source, shuffle
        where = getattr(source, "path", getattr(source, "root", ""))
        self.name = f"{getattr(source, 'name', type(source).__name__)} {str(where)!r}"

    def items(self, epoch: int, slot: int, nslots: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        n = len(self.source)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        return iter(order[slot::nslots].tolist())

    def decode(self, i: int) -> dict:
        return self.source[i]


class StreamDataset(IterableDataset):
    """One stream, or a weighted mixture of streams, decoded and transformed per worker.

    ``components``: list of ``(stream, fn, weight)``; a stream has ``items(epoch, slot, nslots,
    seed)`` and ``decode(item)`` (:class:`~m3ae.data.webdataset.ShardSource`,
    :class:`IndexedStream`). One component: its epoch ends when its items do. Several: an
    endless stream; ``mode="batch"`` draws a component for each block of ``batch_size`` items
    (so every batch comes from one component), ``mode="sample"`` for each item; a component
    that runs out starts its next epoch.
    """

    def __init__(self, components: list, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mode: str = "batch", batch_size: int = 1, drop_skipped: SkipCounter | None = None):
        check_choice("data.mixture_mode", mode, MixtureMode)
        self.components, self.seed, self.rank, self.world_size = components, seed, rank, world_size
        self.mode, self.batch_size = mode, batch_size
        # Outside PretrainLoader (e.g. evaluation's own DataLoader): count skips here, drop markers.
        self.skips = drop_skipped
        self.epoch = 0
        self.resume_pos: dict[int, int] = {}  # worker id -> raw items to skip (set by the loader)
        # DataLoader worker w plays reader w + rotation: a resumed epoch's first batch then comes
        # from the reader whose turn it was (the DataLoader always asks its worker 0 first).
        self.rotation = 0

    @property
    def name(self) -> str:
        return "+".join(c[0].name for c in self.components)

    def _items(self, epoch: int, slot: int, nslots: int):
        if len(self.components) == 1:
            for item in self.components[0][0].items(epoch, slot, nslots, self.seed):
                yield 0, item
            return
        rng = random.Random(f"{self.seed}/{epoch}/{slot}/mixture")
        weights = [c[2] for c in self.components]
        iters: list = [None] * len(self.components)
        epochs = [epoch * 1000] * len(self.components)

        def next_item(c: int):
            for _ in range(2):
                if iters[c] is None:
                    iters[c] = iter(self.components[c][0].items(epochs[c], slot, nslots, self.seed + 7919 * c))
                try:
                    return next(iters[c])
                except StopIteration:
                    iters[c], epochs[c] = None, epochs[c] + 1
            raise DataError(f"mixture component {c} ({self.components[c][0].name}) has no data for reader "
                            f"slot {slot} of {nslots}; use fewer workers or data.resample=true")

        block = self.batch_size if self.mode == "batch" else 1
        while True:
            c = rng.choices(range(len(self.components)), weights)[0]
            for _ in range(block):
                yield c, next_item(c)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = ((info.id + self.rotation) % info.num_workers, info.num_workers) if info is not None else (0, 1)
        slot, nslots = self.rank * nw + wid, self.world_size * nw
        skip = self.resume_pos.get(wid, 0)
        for pos, (c, item) in enumerate(self._items(self.epoch, slot, nslots)):
            if pos < skip:
                continue  # already used before the resume: not decoded
            stream, fn, _ = self.components[c]
            seed = zlib.crc32(f"{self.seed}/{self.epoch}/{slot}/{pos}".encode())
            sample = process(stream.decode, item, fn, seed)
            if self.skips is not None:
                self.skips.add(sample.pop("_events", ()), seen=0 if sample.get("_marker") else 1)
                if "_skip" in sample:
                    continue
            sample["_pos"] = (wid, pos + 1)
            yield sample


class PretrainLoader(DataLoader):
    """A DataLoader that counts skipped samples, drops batches left empty by them, and can
    save and restore its exact position (see the module docstring)."""

    def __init__(self, dataset, *, skips: SkipCounter, rank: int = 0, world_size: int = 1,
                 device_decoder=None, **kw):
        super().__init__(dataset, **kw)
        self.skips, self.rank, self.world_size = skips, rank, world_size
        self.device_decoder = device_decoder  # data.decode_device: finishes each batch's images
        self._epoch = 0
        self._worker_pos: dict[int, int] = {}
        self._next_worker = 0  # the reader whose batch comes next (stream sources with workers)
        self._read = 0

    @property
    def is_stream(self) -> bool:
        return isinstance(self.dataset, StreamDataset)

    def state_dict(self) -> dict:
        state = {"skips": self.skips.state_dict(), "world_size": self.world_size, "rank": self.rank}
        if self.is_stream:
            state.update(kind="stream", epoch=self._epoch, num_workers=self.num_workers,
                         worker_pos={str(k): v for k, v in self._worker_pos.items()}, next_worker=self._next_worker)
        else:
            state.update(kind="map", epoch=self.sampler.epoch, position=self.sampler.start + self._read,
                         offset=getattr(self.sampler, "offset", 0))
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise DataError(f"the data position was saved with world size {state['world_size']}, "
                            f"this run has {self.world_size}; resume with the same number of ranks")
        self.skips.load_state_dict(state["skips"])
        if state["kind"] == "stream":
            if not self.is_stream:
                raise DataError("the saved data position is for a stream source, this run reads an indexable one")
            if state["num_workers"] not in (None, self.num_workers):  # None: from the epoch's start
                raise DataError(f"the stream position was saved with data.num_workers={state['num_workers']}; "
                                f"resume with the same number (this run has {self.num_workers})")
            self._epoch = state["epoch"]
            self._worker_pos = {int(k): v for k, v in state["worker_pos"].items()}
            self._next_worker = state.get("next_worker", 0)  # older checkpoints: as they resumed before
        elif state.get("offset"):
            self.sampler.set_position(state["epoch"], state["position"], state["offset"])
        else:
            self.sampler.set_position(state["epoch"], state["position"])

    def __iter__(self):
        if self.is_stream:
            self.dataset.epoch, self.dataset.resume_pos = self._epoch, dict(self._worker_pos)
            self.dataset.rotation = self._next_worker
        self._read, good = 0, 0
        for batch in super().__iter__():
            if self.device_decoder is not None and "jpeg" in batch:
                batch = self.device_decoder(batch)
            n = batch.get("num_read", len(batch["key"]))
            self._read += n
            if "stream_pos" in batch:
                wid, pos = batch["stream_pos"]
                self._worker_pos[wid] = max(pos, self._worker_pos.get(wid, 0))
                self._next_worker = (wid + 1) % max(self.num_workers, 1)
            self.skips.add(batch.get("data_events", ()), seen=n)
            self.skips.check()
            if batch["key"]:
                good += len(batch["key"])
                yield batch
        self.skips.check(force=True)  # also judged at every epoch end, however few were read
        if not good and (self._read or self.skips.shards):
            raise DataError(f"data source {self.skips.source}: every sample read was skipped: {self.skips.summary()}")
        if self.is_stream:
            self._epoch, self._worker_pos, self._next_worker = self._epoch + 1, {}, 0
        elif isinstance(self.sampler, EpochSampler):
            self.sampler.set_position(self.sampler.epoch + 1, 0)
        self._read = 0


# A resumed run's position, also on another number of processes (the trainer calls resume_position).
def resume_position(st: dict, loader, rank: int, world: int, origin) -> tuple[dict, str | None]:
    """:func:`data_position` as ``loader`` (a :class:`PretrainLoader` or a cache's loader) can
    take it: a position at an offset into the epoch (after a change of process count) needs a
    sampler that can start there, else the epoch starts afresh, said in the note."""
    position, note = data_position(st, rank, world, origin)
    if position.get("offset") and not hasattr(getattr(loader, "sampler", None), "offset"):
        position = afresh(position)  # this source's sampler cannot start at an offset
        note = (f"note: this data source cannot continue epoch {position['epoch']} of {origin} on "
                f"{world} processes; the epoch starts afresh; the skip counts continue")
    return position, note


def data_position(st: dict, rank: int, world: int, origin) -> tuple[dict, str | None]:
    """This rank's data position from a trainer state ``st`` (its ``world_size`` and
    ``data_per_rank``, or ``data``) read from ``origin`` (the checkpoint, named in the note),
    converted when the process count changed, and a note for the user when the conversion
    cannot keep the position.

    On a change the skip counts of all old ranks go to the new rank 0 (the rest start at 0),
    so the sums that the metrics show continue. An indexable ("map") position converts for
    any world size: see :func:`convert_map_position`. A stream's per-worker positions do not
    map onto other reader slots, so its epoch starts afresh, said in the note."""
    old_world = st.get("world_size", 1)
    per_rank = st.get("data_per_rank") or [st["data"]]
    if old_world == world and len(per_rank) == world:
        return dict(per_rank[rank]), None
    total = SkipCounter.merged([d["skips"] for d in per_rank])
    skips = total.state_dict() if rank == 0 else SkipCounter().state_dict()
    data = dict(per_rank[0], skips=skips, world_size=world, rank=rank)
    converted = convert_map_position(per_rank, world) if data.get("kind") == "map" else None
    if converted is not None:
        data.update(converted)
        return data, None
    return afresh(data), (f"note: {origin} was written by {old_world} processes reading a "
                          f"{'stream' if data.get('kind') == 'stream' else 'source'} whose position cannot be "
                          f"mapped onto {world}; epoch {data.get('epoch', 0)} starts afresh (its samples read "
                          f"before the checkpoint are read again); the skip counts continue")


def afresh(data: dict) -> dict:
    """A data position moved back to the start of its epoch (counts kept)."""
    if data.get("kind") == "stream":
        # None: whatever this run's loader has; worker 0's turn first, as in a fresh epoch.
        return dict(data, worker_pos={}, num_workers=None, next_worker=0)
    return dict(data, position=0, offset=0)


def convert_map_position(per_rank: list[dict], world: int) -> dict | None:
    """An epoch position of W ranks as one for ``world`` ranks, reading every sample of the
    epoch once over the whole run.

    Rank r of W reads positions ``offset + r, offset + r + W, ...`` of the epoch's order, so
    after p samples each the ranks have read exactly the first ``offset + W * p``. The new
    ranks split the rest: with no offset when that count divides by the new world size (the
    same order an uninterrupted run of that size reads), else from an offset."""
    first = per_rank[0]
    if any(d.get("epoch") != first["epoch"] or d["position"] != first["position"] for d in per_rank):
        return None  # not an even split (a source of another kind): nothing to convert
    read = first.get("offset", 0) + first["position"] * len(per_rank)
    if read % world == 0:
        return {"epoch": first["epoch"], "position": read // world, "offset": 0}
    return {"epoch": first["epoch"], "position": 0, "offset": read}
