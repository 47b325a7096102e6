"""The preprocess config tree: input, output, one section per modality, the executor.

    # mmdata preprocess pipelines/demo.yaml [key=value ...]
    input:   manifest or tars (prep/sources.py)
    output:  root, name, partition size
    text / image / audio: each encoder's settings (prep/text.py, image.py, audio.py)
    ray:     where partitions run
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmdata.config import require, require_choice
from mmdata.prep.audio import AudioConfig
from mmdata.prep.image import ImageConfig
from mmdata.prep.sources import InputConfig
from mmdata.prep.text import TextConfig


@dataclass
class OutputConfig:
    root: str = "data/datasets"     # local path or fsspec URL (s3://bucket/prefix)
    name: str = "dataset"           # the dataset directory is <root>/<name>-<fingerprint>
    samples_per_shard: int = 1000   # one input partition = this many rows = one shard
    max_shard_bytes: int = 0        # >0: split a partition's shard when it would exceed this
    storage_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        require(bool(self.root.strip()), "root", "must name a folder or URL for the datasets; got an empty value")
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                f"must be a plain name; got {self.name!r}")
        require(self.samples_per_shard > 0, "samples_per_shard", f"must be positive; got {self.samples_per_shard}")
        require(self.max_shard_bytes == 0 or self.max_shard_bytes >= 10240, "max_shard_bytes",
                f"must be 0 (no limit) or at least 10240; got {self.max_shard_bytes}")


@dataclass
class RayConfig:
    executor: str = "auto"          # auto (Ray for a cluster; else in-process or local processes by size) | processes | ray | serial
    address: str | None = None      # an existing cluster ("auto", "ray://..." or host:port); env RAY_ADDRESS too
    num_cpus: int | None = None     # local processes or Ray instance; default: all cores
    max_in_flight: int = 0          # partitions queued at once; 0 = 2 x cluster CPUs
    auto_min_samples: int = 300     # auto: local processes once they take this many samples off one core (0: always)

    def validate(self) -> None:
        require_choice(self.executor, "executor", ("auto", "processes", "ray", "serial"))
        require(self.num_cpus is None or self.num_cpus > 0, "num_cpus", f"must be positive; got {self.num_cpus}")
        require(self.max_in_flight >= 0, "max_in_flight", f"must be >= 0; got {self.max_in_flight}")
        require(self.auto_min_samples >= 0, "auto_min_samples", f"must be >= 0; got {self.auto_min_samples}")


@dataclass
class PreprocessConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    max_error_rate: float = 0.05    # rejected / input samples above this makes the run fail
    progress: bool = True

    def validate(self) -> None:
        require(0.0 <= self.max_error_rate <= 1.0, "max_error_rate",
                f"must be between 0 and 1; got {self.max_error_rate}")
