"""The shard format's names in one place: member extensions, key rules, errors.

A sample in a shard is a group of tar members sharing a key:
``<key>.json`` (always), ``<key>.txt`` + ``<key>.tokens.npy`` (text),
``<key>.jpg|.webp|.png`` (image), ``<key>.mel.npy`` (+ ``<key>.flac``) (audio),
``<key>.cls`` (label). docs/format.md is the contract.
"""

from __future__ import annotations

import hashlib
import re

FORMAT_VERSION = 3   # 3: the index's split column and the json's "split"; 2: each member's crc32 in the index
# The format version the member cache's entries were made under: v3 changed the index and the json member,
# not any member the cache holds, so entries made under v2 stay valid (no recomputed features).
MEMBER_FORMAT_VERSION = 2
# Bumped whenever the bytes produced for the same input and config change (a new resampler,
# encoder settings...). It is part of every fingerprint, so upgraded code never reuses shards
# that older code wrote differently. FORMAT_VERSION is the reader-facing contract.
PROCESSING_VERSION = 7  # 7: mel made from the 16-bit waveform (the member cache keeps it); 6: mel power as re²+im² (a float16 ulp apart from |X|²); 5: image.fast_downscale; 4: safe ids that look like hashed keys are hashed too; 3: mel.npy in C order

# Member extensions. Order here is the order members are written in a sample.
JSON = "json"
TEXT = "txt"
TOKENS = "tokens.npy"
IMAGE_EXTS = ("jpg", "webp", "png")
MEL = "mel.npy"
FLAC = "flac"
LABEL = "cls"
MEMBER_ORDER = (JSON, TEXT, TOKENS, *IMAGE_EXTS, MEL, FLAC, LABEL)

MODALITIES = ("text", "image", "audio")
# the members a reader decodes for each modality (txt and flac are kept for people, not for training)
MODALITY_MEMBERS = {"text": (TOKENS,), "image": IMAGE_EXTS, "audio": (MEL,)}

DATASET_JSON = "dataset.json"
ERRORS_JSONL = "errors.jsonl"
TOKENIZER_FILE = "tokenizer.model"
INDEX_DIR = "index"

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_HASHED_KEY = re.compile(r"_[0-9a-f]{10}$")


def make_key(sample_id: str) -> str:
    """A WebDataset-safe key for an id: the id itself when it is safe.

    WebDataset splits member names at the first dot and treats slashes as
    directories, so any other id becomes a readable, sanitised prefix plus a
    hash of the full id. A safe id that ends the way such keys do
    (``_`` + 10 hex digits) is hashed too, so that no id can equal another
    id's key. The original id always survives in ``<key>.json``.
    """
    if _SAFE_KEY.match(sample_id) and not _HASHED_KEY.search(sample_id):
        return sample_id
    digest = hashlib.sha1(sample_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    prefix = _UNSAFE_CHARS.sub("_", sample_id)[:48].strip("_")
    return f"{prefix}_{digest}" if prefix else f"id_{digest}"


def shard_name(partition: int, part: int = 0) -> str:
    """``shard-000007.tar``; a partition split by ``max_shard_bytes`` adds ``_1``, ``_2``..."""
    return f"shard-{partition:06d}.tar" if part == 0 else f"shard-{partition:06d}_{part}.tar"


def index_name(shard: str) -> str:
    """The index file of a shard, relative to the dataset directory: ``index/shard-000007.parquet``."""
    return f"{INDEX_DIR}/{shard.removesuffix('.tar')}.parquet"


def id_hash(sample_id: str) -> int:
    """A sample id as 64 bits: to find duplicate ids in bounded memory, and to split train/eval by id."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


class SampleError(Exception):
    """A problem with one sample's input: counted and reported, never fatal.

    ``reason`` is a short stable slug (``corrupt_image``, ``missing_file``...)
    used for counting in summaries; the message says what was expected.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(without_addresses(message))
        self.reason = reason


def without_addresses(message: str) -> str:
    """Libraries put object reprs in messages (``<_io.BytesIO object at 0x7f3a...>``); reports must be the
    same bytes run after run, so the address goes."""
    return _ADDRESS.sub(">", message)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line without object addresses: for messages that must not vary by run."""
    text = " ".join(without_addresses(str(error)).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
