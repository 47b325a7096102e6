"""A dataset's per-sample index, loaded as columns: what the loader plans and seeks with.

Reads the per-shard Parquet files (never the tars) into numpy arrays: one
row per sample with its shard number, each member's byte range, presence
flags and lengths. Memory is about 100 bytes per sample, shared with
DataLoader workers through fork's copy-on-write.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdata import storage
from mmdata.dataset import DatasetDescription, DatasetError, load_description
from mmdata.schema import MEMBER_ORDER, MODALITIES, id_hash


@dataclass
class Catalog:
    dataset: str
    description: DatasetDescription
    shard_urls: list[str]
    shard_bytes: np.ndarray          # [n_shards] int64
    shard: np.ndarray                # [n] int32: which shard each sample is in
    keys: pa.Array                   # [n] tar keys (for error messages)
    ids: pa.Array                    # [n] original ids
    offsets: dict[str, np.ndarray]   # ext -> [n] int64 data offset, -1 when absent
    sizes: dict[str, np.ndarray]     # ext -> [n] int64 size
    n_tokens: np.ndarray             # [n] int32, 0 when absent
    audio_frames: np.ndarray         # [n] int32, 0 when absent
    label: np.ndarray                # [n] int64, -1 when absent
    has: dict[str, np.ndarray]       # modality -> [n] bool
    split: np.ndarray                # [n] int32: the input's split name as a number into split_names, -1 none
    split_names: tuple[str, ...]     # the names the input gave (format v3), e.g. ("eval", "train")

    def __len__(self) -> int:
        return len(self.shard)

    def present(self, modality: str) -> int:
        return int(self.has[modality].sum())

    def ids_of(self, rows: np.ndarray) -> list[str]:
        """The ids of ``rows``, sliced straight from the Arrow buffers.

        ``ids.take(rows)`` is cheap on its own but many times slower inside a loading loop (Arrow's
        allocator, not the work), enough to show in a worker's time per sample.
        """
        ids = self.ids
        width = np.dtype(np.int64 if pa.types.is_large_string(ids.type) else np.int32)
        validity, offsets, data = ids.buffers()
        ends = np.frombuffer(offsets, width, count=len(ids) + 1, offset=ids.offset * width.itemsize)
        chars = memoryview(data) if data is not None else memoryview(b"")
        return [str(chars[start:end], "utf-8") for start, end in zip(ends[rows].tolist(), ends[rows + 1].tolist())]


def load_catalog(dataset: str, storage_options: dict | None = None) -> Catalog:
    """Read dataset.json and every shard's index file."""
    options = storage_options or {}
    description = load_description(dataset, options)
    shards = description.shards
    urls = [description.index_url(s) for s in shards]
    try:
        indexes = storage.read_many(urls, options, storage.MAX_METADATA_BYTES)
    except FileNotFoundError as e:
        raise DatasetError(f"{dataset}: an index file is missing ({e}); rebuild the dataset") from None
    except OSError as e:
        raise DatasetError(f"{dataset}: an index file cannot be read ({e}); rebuild the dataset") from None
    tables = [read_index(url, data) for url, data in zip(urls, indexes)]
    table = pa.concat_tables(tables) if tables else None
    n = len(table) if table is not None else 0
    counts = [len(t) for t in tables]
    shard = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
    offsets = {ext: np.full(n, -1, np.int64) for ext in MEMBER_ORDER}
    sizes = {ext: np.zeros(n, np.int64) for ext in MEMBER_ORDER}
    if n:
        fill_members(table.column("members"), offsets, sizes)
    column = lambda name, fill, dtype: (  # noqa: E731
        table.column(name).fill_null(fill).to_numpy().astype(dtype) if n else np.zeros(0, dtype))
    return Catalog(
        dataset=dataset,
        description=description,
        shard_urls=[description.shard_url(s) for s in shards],
        shard_bytes=np.array([s.bytes for s in shards], np.int64),
        shard=shard,
        keys=table.column("key").combine_chunks() if n else pa.array([], pa.string()),
        ids=table.column("id").combine_chunks() if n else pa.array([], pa.string()),
        offsets=offsets,
        sizes=sizes,
        n_tokens=column("n_tokens", 0, np.int32),
        audio_frames=column("audio_frames", 0, np.int32),
        label=column("label", -1, np.int64),
        has={m: column(f"has_{m}", False, bool) for m in MODALITIES},
        **split_column(table, n),
    )


def read_index(url: str, data: bytes) -> pa.Table:
    try:
        # ParquetFile, not read_table: read_table imports pyarrow.dataset, ~0.1 s of a loader's start
        return pq.ParquetFile(io.BytesIO(data)).read()
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{url} is not a readable index ({e}); rebuild the dataset") from None


def split_column(table: pa.Table | None, n: int) -> dict:
    """The split column as numbers and the names they stand for (4 bytes a sample, not a string);
    all -1 for an index without one (format v2 and before)."""
    if not n or "split" not in table.column_names:
        return {"split": np.full(n, -1, np.int32), "split_names": ()}
    encoded = table.column("split").combine_chunks().dictionary_encode()
    names = tuple(encoded.dictionary.to_pylist())
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    return {"split": codes, "split_names": names}


def fill_members(members: pa.ChunkedArray, offsets: dict, sizes: dict) -> None:
    """Scatter the list<struct<ext, offset, size>> column into per-ext arrays (vectorised).

    Format v2 adds a ``crc32`` field to the struct; fields are taken by name, so v1 and v2 indexes read the
    same way. The loader does not check checksums (``mmdata verify`` does): a batch never pays for them."""
    flat = pa.concat_arrays([chunk.flatten() for chunk in members.chunks]) if members.num_chunks else None
    lengths = np.concatenate([chunk.value_lengths().to_numpy(zero_copy_only=False) for chunk in members.chunks])
    sample = np.repeat(np.arange(len(lengths)), lengths)
    ext = flat.field("ext").to_numpy(zero_copy_only=False)
    off = flat.field("offset").to_numpy()
    size = flat.field("size").to_numpy()
    for name in np.unique(ext):
        if name not in offsets:
            offsets[name] = np.full(len(lengths), -1, np.int64)
            sizes[name] = np.zeros(len(lengths), np.int64)
        where = ext == name
        offsets[name][sample[where]] = off[where]
        sizes[name][sample[where]] = size[where]


def split_mask(catalog: Catalog, split: str, eval_fraction: float, train_splits=("train",),
               eval_splits=("eval",)) -> np.ndarray:
    """The rows of ``split`` (all | train | eval). A sample whose input named its split (the index's split
    column) is in train when that name is one of ``train_splits``, in eval when one of ``eval_splits``, and in
    neither otherwise (e.g. "test"); any other sample is split by a hash of its id, ``eval_fraction`` of them
    held out: deterministic, and stable when rows are added or reordered."""
    n = len(catalog)
    if split == "all" or n == 0:
        return np.ones(n, bool)
    wanted = {name.lower() for name in (train_splits if split == "train" else eval_splits)}
    named = catalog.split >= 0
    in_named = np.array([name.lower() in wanted for name in catalog.split_names] + [False], bool)
    mask = in_named[np.where(named, catalog.split, len(catalog.split_names))]
    unnamed = np.flatnonzero(~named)
    if len(unnamed):
        mask[unnamed] = hash_split(catalog.ids_of(unnamed), eval_fraction) == (split == "eval")
    return mask


def hash_split(ids: list[str], eval_fraction: float) -> np.ndarray:
    """True for the ids held out by hash: ``eval_fraction`` of them, the same ones in every run."""
    if eval_fraction <= 0:
        return np.zeros(len(ids), bool)
    hashed = np.fromiter((id_hash(i) for i in ids), np.uint64, len(ids))
    return hashed < np.uint64(int(eval_fraction * 2**64 - 1))


def split_counts(catalog: Catalog, eval_fraction: float, train_splits, eval_splits) -> dict[str, int]:
    """How a dataset's samples are split: train, eval and neither (an input split such as "test"), and how
    many of them the input's split column placed ("named"; the rest by id hash)."""
    train = split_mask(catalog, "train", eval_fraction, train_splits, eval_splits)
    held = split_mask(catalog, "eval", eval_fraction, train_splits, eval_splits)
    return {"train": int(train.sum()), "eval": int(held.sum()), "neither": int((~train & ~held).sum()),
            "named": int((catalog.split >= 0).sum())}
