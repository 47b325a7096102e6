"""The sample order of an epoch, as a pure function of (catalogs, seed, epoch, layout).

    shards shuffled per epoch -> samples shuffled within windows of W shards
    -> sources mixed by weight -> [optional] length bucketing -> global batches
    -> rank r takes rows [r*B, (r+1)*B) of each global batch of B*world samples
    -> DataLoader worker w takes global batches start+w, start+w+k, ... (k workers)

Because everything is a function of a few integers, the loader's state is
tiny (epoch, samples consumed) and resuming is arithmetic, not replay.
A change of batch layout mid-epoch (elastic resume) is a new *segment*: the
samples before it keep their places, the rest are laid out again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Source:
    """One dataset's selected rows, grouped by shard."""
    rows: np.ndarray          # catalog rows in dataset order
    shard: np.ndarray         # shard of each row (same length)
    lengths: np.ndarray       # bucketing length of each row (tokens or frames; zeros when unused)
    weight: float = 1.0


def source_order(source: Source, seed: int, epoch: int, shuffle: bool, window: int, salt: int,
                 run: int = 1) -> np.ndarray:
    """Positions into ``source.rows`` for one pass: shards shuffled, then samples within shard windows.

    ``run`` > 1 shuffles runs of that many consecutive samples of a shard instead of single samples: a
    batch then holds a few runs, each one remote request instead of ``run`` (fewer, larger reads from
    object storage), at the price of neighbours in a shard often sharing a batch.
    """
    n = len(source.rows)
    if not shuffle or n == 0:
        return np.arange(n)
    shards, starts = np.unique(source.shard, return_index=True)
    ends = np.append(starts[1:], n)
    rng = np.random.default_rng([seed, epoch, salt, 0])
    shard_order = rng.permutation(len(shards))
    pieces = []
    for w in range(0, len(shard_order), window):
        members = np.concatenate([np.arange(starts[s], ends[s]) for s in shard_order[w: w + window]])
        shuffled = np.random.default_rng([seed, epoch, salt, 1, w])
        if run == 1:
            pieces.append(shuffled.permutation(members))
            continue
        runs = [r for s in shard_order[w: w + window] for r in np.array_split(
            np.arange(starts[s], ends[s]), -(-(ends[s] - starts[s]) // run))]
        pieces += [runs[i] for i in shuffled.permutation(len(runs))]
    return np.concatenate(pieces)


def mixed_order(sources: list[Source], seed: int, epoch: int, shuffle: bool, window: int,
                length: int, run: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(source index, position in that source's rows) for ``length`` draws.

    One source: its order, cut to ``length`` (or followed by further shuffled
    passes when ``length`` is longer). Several: each draw picks a source with
    probability proportional to its weight; a source that runs out starts a new
    shuffled pass (so a small, heavily weighted source repeats within an epoch).
    """
    if len(sources) == 1:
        n = len(sources[0].rows)
        n_passes = max(1, -(-length // n)) if n else 1
        passes = [source_order(sources[0], seed, epoch if p == 0 else epoch * 1_000_003 + p, shuffle, window, 0, run)
                  for p in range(n_passes)]
        order = np.concatenate(passes)[:length]
        return np.zeros(len(order), np.int64), order
    weights = np.array([s.weight for s in sources], float)
    pick = np.random.default_rng([seed, epoch, 2]).choice(len(sources), size=length, p=weights / weights.sum())
    positions = np.zeros(length, np.int64)
    for i, source in enumerate(sources):
        where = np.flatnonzero(pick == i)
        n = len(source.rows)
        passes = [source_order(source, seed, epoch * 1_000_003 + p, shuffle, window, 1 + i, run)
                  for p in range(-(-len(where) // n))] if n else []
        positions[where] = np.concatenate(passes)[: len(where)] if passes else 0
    return pick.astype(np.int64), positions


def bucket(order: np.ndarray, lengths: np.ndarray, global_batch: int, group_batches: int,
           seed: int, tag: int) -> np.ndarray:
    """Sort groups of ``group_batches`` global batches by length, then shuffle the batches.

    Batches then hold similar lengths (less padding) while the epoch stays a
    permutation of the same samples.
    """
    out = order.copy()
    group = global_batch * group_batches
    rng = np.random.default_rng([seed, tag, 3])
    whole = len(order) - len(order) % global_batch  # the partial tail is never bucketed
    for start in range(0, whole, group):
        chunk = out[start: min(start + group, whole)]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = chunk.reshape(-1, global_batch)
        out[start: start + len(chunk)] = batches[rng.permutation(len(batches))].reshape(-1)
    return out


@dataclass(frozen=True)
class Layout:
    """How an epoch is cut into batches from sample ``start`` on."""
    start: int          # global samples already consumed when this layout began
    batch_size: int     # per rank
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


def epoch_sequence(draws: np.ndarray, lengths: np.ndarray | None, layouts: list[Layout], seed: int, epoch: int,
               bucket_batches: int, pad: bool) -> np.ndarray:
    """The epoch's final sample sequence (indices into ``draws``) under the given layouts.

    Each layout re-lays the samples not yet consumed; bucketing (when ``lengths``
    is given) permutes only within that remainder, so consumed samples never move.
    """
    order = np.arange(len(draws))
    for i, layout in enumerate(layouts):
        rest = order[layout.start:]
        if lengths is not None:
            rest = bucket(rest, lengths, layout.global_batch, bucket_batches, seed, epoch * 1009 + i)
        order = np.concatenate([order[: layout.start], rest])
    last = layouts[-1]
    tail = (len(order) - last.start) % last.global_batch
    if tail and pad:
        order = np.concatenate([order, np.resize(order, last.global_batch - tail)])  # cycles if needed
    elif tail:
        order = order[: len(order) - tail]
    return order


def batches_in_sequence(length: int, layout: Layout) -> int:
    """Global batches (= batches per rank) from the layout's start to the end of a sequence of ``length``."""
    return (length - layout.start) // layout.global_batch


def rank_batch(layout: Layout, batch: int, rank: int) -> np.ndarray:
    """Sequence positions of rank ``rank``'s part of global batch ``batch`` (counted from layout.start)."""
    start = layout.start + batch * layout.global_batch + rank * layout.batch_size
    return np.arange(start, start + layout.batch_size)


def sequence_length(n_draws: int, layout: Layout, pad: bool) -> int:
    """Length of the sequence ``epoch_sequence`` returns, without building it."""
    tail = (n_draws - layout.start) % layout.global_batch
    return n_draws + (layout.global_batch - tail if tail and pad else -tail)


def worker_messages(first: int, total: int, worker: int, num_workers: int, per_message: int):
    """The batches of each message worker ``worker`` sends when iteration starts at batch ``first``: ranges.

    Messages go round-robin over workers from ``first``, matching torch DataLoader's
    in-order round-robin, so the main process receives batches first, first+1,
    first+2... Each worker's first message holds one batch, so the first batch
    (after a start or a resume) costs one batch's work; later ones ``per_message``.
    """
    workers, per_message = max(1, num_workers), max(1, per_message)
    if worker < total - first:
        yield range(first + worker, first + worker + 1)
    start = first + workers + worker * per_message
    while start < total:
        yield range(start, min(total, start + per_message))
        start += workers * per_message
