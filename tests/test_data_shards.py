"""Shard spec expansion and the per-process split."""

import fsspec
import pytest

from ipadapter_jax.data.shards import (
    ShardSpecError,
    expand_shard_spec,
    shards_for_process,
    split_shards,
    url_scheme,
)


def test_brace_expansion_keeps_order_and_zero_padding():
    urls = expand_shard_spec("/data/shards/{00000..00003}.tar")
    assert urls == [f"/data/shards/{i:05d}.tar" for i in range(4)]
    assert expand_shard_spec("/d/{a,b}-{0..1}.tar") == ["/d/a-0.tar", "/d/a-1.tar", "/d/b-0.tar", "/d/b-1.tar"]


def test_lists_and_double_colon_are_concatenated():
    assert expand_shard_spec(["/x/{0..1}.tar", "/y/z.tar"]) == ["/x/0.tar", "/x/1.tar", "/y/z.tar"]
    assert expand_shard_spec("/x/{0..1}.tar::/y/z.tar") == ["/x/0.tar", "/x/1.tar", "/y/z.tar"]


def test_local_glob_sorted_and_empty_glob_is_an_error(tmp_path):
    for name in ["b.tar", "a.tar", "c.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert expand_shard_spec(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_shard_spec(f"file://{tmp_path}/a*.tar") == [str(tmp_path / "a.tar")]
    with pytest.raises(ShardSpecError, match="matched no files"):
        expand_shard_spec(str(tmp_path / "*.zip"))


def test_remote_urls_and_pipes_pass_through_brace_expanded():
    assert expand_shard_spec("gs://bucket/s/{0..1}.tar") == ["gs://bucket/s/0.tar", "gs://bucket/s/1.tar"]
    # Globs inside a pipe command belong to the shell, not to us.
    assert expand_shard_spec("pipe:gsutil cat gs://b/{0..1}*.tar") == [
        "pipe:gsutil cat gs://b/0*.tar",
        "pipe:gsutil cat gs://b/1*.tar",
    ]
    assert url_scheme("pipe:cat x") == "pipe" and url_scheme("/a/b.tar") == "" and url_scheme("s3://b/k") == "s3"


def test_fsspec_glob_for_urls_with_a_scheme():
    fs = fsspec.filesystem("memory")
    for name in ["01.tar", "00.tar", "zz.txt"]:
        fs.pipe(f"/globtest/{name}", b"x")
    urls = expand_shard_spec("memory://globtest/*.tar")
    assert urls == ["memory:///globtest/00.tar", "memory:///globtest/01.tar"]


def test_empty_spec_is_an_error():
    with pytest.raises(ShardSpecError):
        expand_shard_spec([])
    with pytest.raises(ShardSpecError):
        expand_shard_spec("  ")


def test_split_is_disjoint_covering_and_strided():
    shards = [f"{i}.tar" for i in range(10)]
    parts = [split_shards(shards, i, 3) for i in range(3)]
    assert parts[0] == ["0.tar", "3.tar", "6.tar", "9.tar"]
    assert parts[1] == ["1.tar", "4.tar", "7.tar"]
    assert sorted(sum(parts, [])) == sorted(shards)
    equal = [split_shards(shards, i, 3, equal_counts=True) for i in range(3)]
    assert [len(p) for p in equal] == [3, 3, 3] and "9.tar" not in sum(equal, [])


def test_a_process_without_shards_is_an_error():
    with pytest.raises(ShardSpecError, match="would get no shard"):
        split_shards(["a.tar", "b.tar"], 0, 3)
    with pytest.raises(ValueError):
        split_shards(["a.tar"], 1, 1)


def test_defaults_come_from_jax():
    # One CPU process: index 0 of 1 gets everything.
    assert shards_for_process("/s/{0..2}.tar") == ["/s/0.tar", "/s/1.tar", "/s/2.tar"]
