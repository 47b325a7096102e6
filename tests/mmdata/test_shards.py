"""The shard writer's own USTAR headers and the sample json built from cached pieces are the bytes the
standard library would write."""

from __future__ import annotations

import json
import random
import tarfile

from mmdata.prep.partition import cached_sample_json
from mmdata.prep.sources import Record
from mmdata.shards import MAX_MEMBER_BYTES, ustar_header


def test_headers_are_tarfiles_for_the_same_member():
    rng = random.Random(0)
    for _ in range(2000):
        name = "".join(rng.choice("abcXYZ09_-") for _ in range(rng.randint(1, 64)))
        name += "." + rng.choice(["json", "txt", "tokens.npy", "jpg", "mel.npy", "flac", "cls"])
        size = rng.choice([0, 1, 511, 512, 513, rng.randint(0, 1 << 30), MAX_MEMBER_BYTES])
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), (name, size)


def test_the_sample_json_from_cached_infos_is_the_whole_document_dumped():
    dump = lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)  # noqa: E731
    infos = {"text": {"n_tokens": 7, "truncated": False}, "image": {"width": 640, "mode": "RGB", "ratio": 1.5},
             "audio": {"duration": 2.0000000001, "samples": 32000, "clipped": 3}}
    for meta in (None, {"z": [1, 2.5, "é"], "a": {"y": None, "b": "\u2028"}}, "plain"):
        for label in (None, 0, 5):
            record = Record(row=3, id="ïd/1 \"q\"", text="t", meta=meta, split="eval" if label else None)
            for kept in (infos, {"image": infos["image"]}):
                expected = dump({"id": record.id, "row": record.row, "label": label, "split": record.split,
                                 "meta": meta, **kept})
                built = cached_sample_json(record, label, {m: dump(i) for m, i in kept.items()})
                assert built == expected.encode("utf-8")
