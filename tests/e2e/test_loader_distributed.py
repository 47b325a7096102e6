"""The loader in real multi-process settings: torchrun + gloo, S3 and HTTP streaming, killed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import batch_ids, loader_config, make_bucket
from mmdata.load.loader import MultimodalLoader

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def test_torchrun_gloo_ranks_get_equal_disjoint_batches_and_resume(demo_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
                          "--standalone",   # rendezvous on a port torchrun picks: nothing can take it first
                          str(HERE / "loader_rank.py"), demo_dataset, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    ids = [i for r in ranks for i in r["ids"]]
    assert len(ids) == len(set(ids)) == (48 // 9) * 9          # 10 shards, 3 ranks x 2 workers
    assert len({len(r["ids"]) for r in ranks}) == 1 and ranks[0]["counts"] == [15, 15, 15]


def test_streams_from_s3_with_and_without_a_cache(demo_dataset, s3, tmp_path):
    import s3fs
    make_bucket(s3, "mm-loader")
    s3fs.S3FileSystem(**s3).put(demo_dataset, "mm-loader/ds", recursive=True)
    local = batch_ids(MultimodalLoader(loader_config(demo_dataset)))
    streamed = loader_config("s3://mm-loader/ds", read={"storage_options": s3})
    assert batch_ids(MultimodalLoader(streamed)) == local
    cache = tmp_path / "cache"
    cached = loader_config("s3://mm-loader/ds", num_workers=2,
                           read={"storage_options": s3, "cache_dir": str(cache), "cache_bytes": 10**9})
    assert batch_ids(MultimodalLoader(cached)) == local
    assert len(list(cache.glob("*shard-*.tar"))) == 10 and not list(cache.glob("*.tmp*"))


def test_streams_over_http_with_and_without_a_cache(demo_dataset, http_server, tmp_path):
    url = http_server(demo_dataset)
    local = batch_ids(MultimodalLoader(loader_config(demo_dataset)))
    assert batch_ids(MultimodalLoader(loader_config(url, num_workers=2))) == local      # range requests
    cache = tmp_path / "cache"
    cached = loader_config(url, num_workers=2, read={"cache_dir": str(cache), "cache_bytes": 10**9})
    assert batch_ids(MultimodalLoader(cached)) == local
    assert len(list(cache.glob("*shard-*.tar"))) == 10 and not list(cache.glob("*.tmp*"))


KILLED = """
import os, sys, time
sys.path.insert(0, {tests!r})
from helpers import loader_config
from mmdata.load.loader import MultimodalLoader
loader = MultimodalLoader(loader_config({dataset!r}, num_workers=2, persistent_workers=True))
it = iter(loader)
next(it)
print(" ".join(open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children").read().split()), flush=True)
time.sleep(600)
"""


def test_a_killed_run_leaves_no_worker_processes(demo_dataset):
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-c", KILLED.format(tests=str(HERE.parent), dataset=demo_dataset)],
                            stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and "Z" not in
                                         Path(f"/proc/{p}/stat").read_text().split()[2] for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert alive == [], f"worker processes {alive} outlived their killed parent"
    leaked = [n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("torch_")]
    assert leaked == []
