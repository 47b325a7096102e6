"""Keys: safe for WebDataset (no dots/slashes), unique, stable."""

import pytest

from mmdata.schema import id_hash, index_name, make_key, shard_name


@pytest.mark.parametrize("sample_id", ["abc", "demo-000001", "A_b-9"])
def test_safe_ids_are_their_own_key(sample_id):
    assert make_key(sample_id) == sample_id


@pytest.mark.parametrize("sample_id", ["a.b.jpg", "dir/file", "with space", "ünï", "../../etc/passwd", "x" * 100, "..."])
def test_unsafe_ids_get_safe_unique_keys(sample_id):
    key = make_key(sample_id)
    assert "." not in key and "/" not in key and " " not in key
    assert key.isascii() and 0 < len(key) <= 64
    assert make_key(sample_id) == key
    assert make_key(sample_id + "!") != key


def test_shard_names():
    assert shard_name(7) == "shard-000007.tar"
    assert shard_name(7, 2) == "shard-000007_2.tar"


def test_a_shards_index_file_is_named_after_it():
    assert index_name("shard-000007.tar") == "index/shard-000007.parquet"
    assert index_name(shard_name(7, 2)) == "index/shard-000007_2.parquet"


def test_id_hash_is_64_stable_bits_that_tell_ids_apart():
    assert id_hash("demo-000001") == id_hash("demo-000001")
    assert id_hash("demo-000001") != id_hash("demo-000002")
    assert 0 <= id_hash("ünï\udc80") < 2**64            # lone surrogates (from odd input bytes) hash too
