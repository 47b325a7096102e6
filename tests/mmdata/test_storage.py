"""Storage helpers: where temporary files go before they are renamed onto their final name."""

from mmdata.storage import temp_path


def test_temporary_files_are_hidden_unique_and_beside_their_target(tmp_path):
    target = tmp_path / "shard-000001.tar"
    a, b = temp_path(target), temp_path(target)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(".shard-000001.tar.") and a.name.endswith(".tmp")
