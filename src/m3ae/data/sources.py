"""Indexable sources: HDF5 (the official M3AE layout), tables, image folders, text files.

Each is a map-style dataset whose item ``i`` is a sample dict ``{key, image (PIL RGB, a uint8
tensor with ``fast_jpeg`` (see :func:`~m3ae.data.decode.decode_image`), or None),
caption (str or None), label (int, -1 unknown)}``; a sample that cannot be read raises
:class:`~m3ae.data.decode.BadSample` (the loader counts and skips it). Everything a source
needs is checked when it is built — the path exists, the columns exist, the source is not
empty, the image paths of a table resolve — so a misconfigured run fails at start-up with a
message that says what was expected, not an hour later in a worker.
"""
from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .decode import BadSample, DataError, DataNotFound, clean_caption, decode_image, log

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "filename", "jpg")
CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "title", "sentence")


class IndexedSource(Dataset):
    """Base: ``len``, ``source[i]`` -> sample dict (with ``_events``), ``captions()``."""

    name = "source"

    def __init__(self, min_side: int = 0, max_chars: int = 1000, fast_jpeg: bool = False):
        self.min_side, self.max_chars, self.fast_jpeg = min_side, max_chars, fast_jpeg

    def _decode(self, data, key: str):
        return decode_image(data, key, self.min_side, self.fast_jpeg)

    def captions(self, limit: int | None = None) -> Iterator[str]:
        raise NotImplementedError

    def _sample(self, key, image, caption, label=-1) -> dict:
        events: list = []
        caption = clean_caption(caption, key, self.max_chars, events)
        return dict(key=key, image=image, caption=caption, label=label, _events=events)


def _require(path: str, what: str, kind: str = "file") -> Path:
    if not path:
        raise DataNotFound(f"data.urls is empty; expected the path of {what}")
    p = Path(path).expanduser()
    ok = p.is_file() if kind == "file" else p.is_dir()
    if not ok:
        raise DataNotFound(f"{path} is not an existing {kind}; expected {what}")
    return p


def _looks_like_data(names: list[str]) -> bool:
    """True when 'column names' look like a data row: an image file name or a long sentence."""
    return any(str(n).lower().endswith(IMAGE_SUFFIXES) or len(str(n).split()) > 3 for n in names)


def _pick_column(wanted: str, found: list[str], candidates: tuple[str, ...], what: str, where: str,
                 option: str = "") -> str:
    if wanted:
        if wanted not in found:
            raise DataError(f"{where} has no column {wanted!r} for the {what}; its columns are {found}")
        return wanted
    for c in candidates:
        if c in found:
            return c
    if _looks_like_data(found):
        raise DataError(f"{where}: the header line seems to be missing (its first line {found} looks like "
                        f"data). Add a header line such as 'image,caption' as its first line (data.image_column and "
                        f"data.caption_column then name the columns if you call them differently)")
    raise DataError(f"{where}: no {what} column found among {found} (tried {list(candidates)}); "
                    f"name it with {option or 'the data option for that column'}")


# --------------------------------------------------------------------------------- HDF5
class HDF5Source(IndexedSource):
    """The official M3AE HDF5 file: ``jpg`` (JPEG bytes) + ``caption`` (UTF-8 bytes) for pairs,
    or ``text`` alone for unpaired text. The file is opened lazily in each worker process
    (an h5py handle must not cross a fork)."""

    name = "hdf5"

    def __init__(self, path: str, image_field: str = "", caption_field: str = "", text_field: str = "",
                 **kw):
        super().__init__(**kw)
        import h5py

        self.path = str(_require(path, "an HDF5 file with datasets 'jpg' + 'caption' or 'text'"))
        try:
            with h5py.File(self.path, "r") as f:
                found = sorted(f.keys())
        except OSError as e:
            raise DataError(f"{path} is not a readable HDF5 file: {e}") from None
        self.image_field = image_field or ("jpg" if "jpg" in found else "")
        self.caption_field = caption_field or next((c for c in ("caption", "text") if c in found), "")
        if text_field:
            self.caption_field = text_field
        for fld in (self.image_field, self.caption_field):
            if fld and fld not in found:
                raise DataError(f"{path} has no dataset {fld!r}; it has {found}")
        if not self.image_field and not self.caption_field:
            raise DataError(f"{path} has neither 'jpg' nor 'caption'/'text' datasets; it has {found}")
        with h5py.File(self.path, "r") as f:
            lens = {fld: len(f[fld]) for fld in (self.image_field, self.caption_field) if fld}
        if len(set(lens.values())) > 1:
            raise DataError(f"{path}: datasets differ in length {lens}")
        self.size = next(iter(lens.values()))
        if self.size == 0:
            raise DataError(f"{path} holds no samples")
        self._file = None

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def _f(self):
        if self._file is None:
            import h5py
            self._file = h5py.File(self.path, "r")
        return self._file

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        key = f"{Path(self.path).name}:{i}"
        f = self._f()
        image = None
        if self.image_field:
            raw = f[self.image_field][i]
            image = self._decode(bytes(raw.tobytes() if hasattr(raw, "tobytes") else raw), key)
        caption = f[self.caption_field][i] if self.caption_field else None
        if image is None and not caption:
            raise BadSample("empty_text", key)
        return self._sample(key, image, caption)

    def captions(self, limit=None):
        f = self._f()
        if self.caption_field:
            n = self.size if limit is None else min(limit, self.size)
            for raw in f[self.caption_field][:n]:
                text = clean_caption(raw, "", self.max_chars, [])
                if text:
                    yield text


# --------------------------------------------------------------------------------- tables
def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                return list(reader.fieldnames or []), rows
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path} line {n} is not JSON: {e}") from None
            cols = sorted({k for r in rows for k in r}) if rows else []
            return cols, rows
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"reading {path} needs pyarrow: pip install 'm3ae[parquet]'") from None
            table = pq.read_table(path)
            return table.column_names, table.to_pylist()
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read table {path}: {e}") from None
    raise DataError(f"{path}: unknown table type {suffix!r}; expected .csv, .tsv, .jsonl or .parquet")


_REPORTED: set[tuple[str, int, int]] = set()  # tables whose repairs were reported (path, size, mtime)


class TableSource(IndexedSource):
    """A CSV/TSV/JSONL/Parquet table with an image-path column and a caption column.

    Image paths are relative to the table's folder (or absolute). Several rows naming the
    same image, or a caption cell holding a list, give that image several captions: the image
    is one sample per epoch and each read picks one caption at random (from the sample's
    augmentation seed), as the COCO pre-training recipes do. Without a caption column the
    table lists unpaired images.
    """

    name = "table"

    def __init__(self, path: str, image_column: str = "", caption_column: str = "", **kw):
        super().__init__(**kw)
        p = _require(path, "a table (.csv, .tsv, .jsonl, .parquet) with image-path and caption columns")
        self.path, self.root = str(p), p.parent
        cols, rows = _read_table(p)
        if not rows:
            raise DataError(f"table {path} has no rows")
        where = f"table {path}"
        self.image_column = _pick_column(image_column, cols, IMAGE_COLUMNS, "image path", where,
                                         "data.image_column")
        self.caption_column = (_pick_column(caption_column, cols, CAPTION_COLUMNS, "caption", where,
                                            "data.caption_column")
                               if caption_column or any(c in cols for c in CAPTION_COLUMNS) else "")
        rows = self._repair_extra_fields(rows, cols, "\t" if ".tsv" in [x.lower() for x in p.suffixes] else ",", where)
        grouped: dict[str, list] = {}
        for r in rows:
            img = r.get(self.image_column)
            if img is None or str(img).strip() == "":
                continue
            caps = grouped.setdefault(str(img).strip(), [])
            cap = r.get(self.caption_column) if self.caption_column else None
            if isinstance(cap, (list, tuple)):
                caps.extend(c for c in cap if c is not None)
            elif cap is not None:
                caps.append(cap)
        if not grouped:
            raise DataError(f"table {path}: column {self.image_column!r} is empty in every row")
        self.images = list(grouped)
        self.caption_lists = [grouped[k] for k in self.images]
        checked = self.images[:20]
        if not any(self._resolve(k).is_file() for k in checked):
            raise DataError(f"table {path}: none of the first {len(checked)} images exists, e.g. "
                            f"{str(self._resolve(checked[0]))!r}; image paths are read relative to the "
                            f"table's folder {str(self.root)!r}")

    def _repair_extra_fields(self, rows: list[dict], cols: list[str], sep: str, where: str) -> list[dict]:
        """CSV rows with more fields than the header (a caption with unquoted commas): when the
        caption is the last column, its pieces are joined back; otherwise the row is dropped.
        Both are counted in ``self.repairs`` and reported once, never done silently."""
        self.repairs = {"extra_fields_joined": 0, "malformed_row": 0}
        kept, example = [], None
        for n, r in enumerate(rows, 2):  # line 1 is the header
            extra = r.pop(None, None) if isinstance(r, dict) else None
            if not extra:
                kept.append(r)
                continue
            example = example or n
            if self.caption_column and cols and self.caption_column == cols[-1]:
                r[self.caption_column] = sep.join([r.get(self.caption_column) or ""] + list(extra))
                self.repairs["extra_fields_joined"] += 1
                kept.append(r)
            else:
                self.repairs["malformed_row"] += 1
        # A run opens its table several times (the dataset, the caption scan, a from-data
        # tokenizer): the same file's repairs are reported once per process.
        st = Path(self.path).stat()
        seen = (self.path, st.st_size, st.st_mtime_ns)
        if seen in _REPORTED:
            return kept
        _REPORTED.add(seen)
        if self.repairs["extra_fields_joined"]:
            log.warning("%s: %d row(s) have more fields than the header (unquoted %r in a caption?), e.g. "
                        "line %d; the extra fields were joined into the caption column %r. Quote such "
                        "captions to silence this.", where, self.repairs["extra_fields_joined"], sep, example,
                        self.caption_column)
        if self.repairs["malformed_row"]:
            log.warning("%s: %d malformed row(s) with more fields than the header were skipped, e.g. line %d "
                        "(quote fields that hold %r)", where, self.repairs["malformed_row"], example, sep)
        return kept

    def _resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.root / p

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        key = self.images[i]
        image = self._decode(self._resolve(key), key)
        caps = self.caption_lists[i]
        # One caption per read; torch's generator is seeded per sample by the loader.
        caption = caps[int(torch.randint(len(caps), ()))] if caps else None
        return self._sample(key, image, caption)

    def captions(self, limit=None):
        n = 0
        for caps in self.caption_lists:
            for c in caps:
                text = clean_caption(c, "", self.max_chars, [])
                if text:
                    yield text
                    n += 1
                    if limit is not None and n >= limit:
                        return


# --------------------------------------------------------------------------------- folders
def _images_under(folder: Path) -> tuple[list[Path], set[Path]]:
    """The image files below ``folder`` (sorted) and its ``.txt`` files, in one walk."""
    images, texts = [], set()
    for p in folder.rglob("*"):
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES and p.is_file():
            images.append(p)
        elif p.suffix == ".txt":
            texts.add(p)
    return sorted(images), texts


class ImageFolderSource(IndexedSource):
    """``root/class/xxx.jpg`` -> labelled images (label = index of the sorted class folder);
    a folder of images with no class sub-folders -> unlabelled images (label -1). Images are
    found at any depth below a class folder (or the root). An ``xxx.txt`` beside an image is
    its caption (img2dataset's ``files`` layout); images without one are unpaired.
    """

    name = "imagefolder"

    def __init__(self, path: str, **kw):
        super().__init__(**kw)
        root = _require(path, "a folder of images (class sub-folders optional)", kind="dir")
        self.root = root
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        self.files: list[Path] = []
        self.labels: list[int] = []
        texts: set[Path] = set()
        if classes and not loose:
            self.classes = classes
            for label, c in enumerate(classes):
                files, found = _images_under(root / c)
                self.files += files
                self.labels += [label] * len(files)
                texts |= found
        else:
            self.classes = []
            self.files, texts = _images_under(root)
            self.labels = [-1] * len(self.files)
        if not self.files:
            raise DataError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        # Known from the walk, so that a folder without captions costs no look-up per image.
        self.caption_files = [t if (t := f.with_suffix(".txt")) in texts else None for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def _caption(self, i: int) -> bytes | None:
        txt = self.caption_files[i]
        return txt.read_bytes() if txt is not None else None

    def __getitem__(self, i: int) -> dict:
        key = str(self.files[i].relative_to(self.root))
        return self._sample(key, self._decode(self.files[i], key), self._caption(i), self.labels[i])

    def captions(self, limit=None):
        texts = (clean_caption(self._caption(i), "", self.max_chars, [])
                 for i, txt in enumerate(self.caption_files) if txt is not None)
        return itertools.islice(filter(None, texts), limit)


# --------------------------------------------------------------------------------- text
class TextSource(IndexedSource):
    """Unpaired text: ``.txt`` files (one caption per line) or ``.jsonl`` (a text field), a
    file or a folder of them. Lines are held in memory: for billions of lines, use shards."""

    name = "text"

    def __init__(self, path: str, text_column: str = "", **kw):
        super().__init__(**kw)
        p = Path(path).expanduser() if path else None
        if p is not None and p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
        else:
            files = [_require(path, "a .txt (one caption per line) or .jsonl file, or a folder of them")]
        self.lines: list[str] = []
        self.keys: list[str] = []
        for f in files:
            if f.suffix == ".jsonl":
                cols, rows = _read_table(f)
                col = _pick_column(text_column, cols, CAPTION_COLUMNS, "text", f"{f}", "data.text_column")
                texts = [r.get(col) for r in rows]
            else:
                raw = f.read_bytes()
                if b"\0" in raw[:8192]:  # git's test for binary content: text never holds NUL
                    raise DataError(f"{f} is not a text file (it holds binary data, e.g. an image or a "
                                    "compressed archive); expected one caption per line")
                texts = raw.decode("utf-8", errors="replace").splitlines()
            for n, t in enumerate(texts):
                if t is not None and str(t).strip():
                    self.lines.append(str(t))
                    self.keys.append(f"{f.name}:{n + 1}")
        if not self.lines:
            raise DataError(f"{path} holds no non-empty lines of text")

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> dict:
        sample = self._sample(self.keys[i], None, self.lines[i])
        if sample["caption"] is None:
            raise BadSample("empty_text", self.keys[i])
        return sample

    def captions(self, limit=None):
        for t in self.lines[:limit]:
            text = clean_caption(t, "", self.max_chars, [])
            if text:
                yield text


SOURCES = {"hdf5": HDF5Source, "table": TableSource, "imagefolder": ImageFolderSource, "text": TextSource}


def open_source(cfg, min_side: int = 0, train: bool = False, defer_jpeg: bool = False):
    """The raw source of one config that reads files (not synthetic, cache or mixture): a
    :class:`~m3ae.data.webdataset.ShardSource` (shuffled shards and buffer when ``train``) or
    an indexable :class:`IndexedSource`. ``defer_jpeg``: shards hand over JPEG bytes for the
    batch to be decoded on the training device (``data.decode_device``)."""
    if cfg.source == "webdataset":
        from .webdataset import ShardSource

        return ShardSource(cfg.urls, shuffle_buffer=cfg.shuffle_buffer if train else 0, shuffle_shards=train,
                           resampled=cfg.resample, min_side=min_side, max_chars=cfg.max_caption_chars,
                           fast_jpeg=cfg.image_backend == "tensor", defer_jpeg=defer_jpeg)
    return open_indexed_source(cfg, min_side)


def open_indexed_source(cfg, min_side: int = 0) -> IndexedSource:
    """The map-style source ``cfg.source`` names, from ``cfg.urls``."""
    kw = dict(min_side=min_side, max_chars=cfg.max_caption_chars, fast_jpeg=cfg.image_backend == "tensor")
    if cfg.source == "hdf5":
        return HDF5Source(cfg.urls, cfg.image_column, cfg.caption_column, cfg.text_column, **kw)
    if cfg.source == "table":
        return TableSource(cfg.urls, cfg.image_column, cfg.caption_column, **kw)
    if cfg.source == "imagefolder":
        return ImageFolderSource(cfg.urls, **kw)
    if cfg.source == "text":
        return TextSource(cfg.urls, cfg.text_column, **kw)
    raise KeyError(cfg.source)

