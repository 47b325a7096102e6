"""The ``mmdata`` command: preprocess, demo-data, info, verify, show."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from mmdata import interrupts
from mmdata.config import ConfigError

DESCRIPTION = """\
Turn multimodal samples (text, image, audio, label) into sharded WebDataset tars.

  mmdata demo-data --out data/demo --n 2000        generate a small learnable dataset
  mmdata preprocess pipelines/demo.yaml [k=v ...]  manifest/tars -> dataset directory
  mmdata info data/datasets/demo                   counts, sizes, errors by reason
  mmdata verify data/datasets/demo [more ...]      re-read every shard; exit 1 if unhealthy
  mmdata show data/datasets/demo --out sheet.png   contact sheet of samples
  mmdata wids-index data/datasets/demo             index for random access with `wids`
  mmdata gc data/datasets --dry-run                store entries no finished dataset uses
"""


# Exit codes (docs/preprocessing.md): 1 a run that finished but failed its check (error rate, verify),
# 2 bad config or input, 3 the environment (disk full, permissions, a path that is a file), 130 interrupted.
EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 2, 3, 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mmdata.dataset import DatasetError
    # SIGTERM (a scheduler's stop) takes Ctrl-C's path: temp files are removed, finished shards kept
    with interrupts.handling_interrupts():
        try:
            code = args.run(args)
            interrupts.check()   # a stop whose exception a library's callback swallowed
            return code
        except (ConfigError, DatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as e:
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
            return EXIT_ENVIRONMENT
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume (finished shards are kept)", file=sys.stderr)
            return EXIT_INTERRUPTED


def entry() -> None:
    """The ``mmdata`` command: :func:`main`, then an exit that skips the interpreter's teardown once torch is
    loaded (a run with audio), which costs 0.6-0.9 s there and does nothing a finished run needs: every file
    is closed, the worker pool stopped, and Ray, if this process started it, is shut down first."""
    code = main()
    if "torch" not in sys.modules:
        sys.exit(code)
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def describe_os_error(e: OSError) -> str:
    """One line: the path, what went wrong, what to do."""
    if isinstance(e, ChildProcessError):   # a worker process died: the message says what to do
        return str(e)
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    advice = {errno.ENOSPC: "the disk is full; free space and rerun the same command (finished shards are kept)",
              errno.EDQUOT: "the disk quota is used up; free space and rerun the same command",
              errno.EROFS: "the filesystem is read-only; choose another output.root",
              errno.EACCES: "no permission; check the path's permissions or choose another output.root",
              errno.EPERM: "no permission; check the path's permissions or choose another output.root",
              errno.ENOTDIR: "a part of the path is a file, not a folder; choose another output.root",
              errno.EEXIST: "a part of the path is a file, not a folder; choose another output.root"}
    return f"{where}{what}; {advice.get(e.errno, 'check the path and rerun the same command')}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdata", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("preprocess", help="preprocess a manifest or tars into a dataset directory",
                       description="Preprocess the input named in CONFIG. Overrides are dotted keys, "
                                   "e.g. output.samples_per_shard=500 image.size=128 ray.address=auto.")
    p.add_argument("config", help="YAML file (see pipelines/)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(run=run_preprocess)

    p = sub.add_parser("demo-data", help="generate the embedded demo dataset and its manifest")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=positive_int, default=2000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl", help="manifest format")
    p.set_defaults(run=run_demo)

    p = sub.add_parser("info", help="summarise a dataset directory")
    p.add_argument("dataset")
    p.set_defaults(run=run_info)

    p = sub.add_parser("verify", help="re-read every shard and check it against the index and counts")
    p.add_argument("dataset", nargs="+", help="one or more dataset directories")
    p.set_defaults(run=run_verify)

    p = sub.add_parser("wids-index", help="write DATASET/wids-index.json for the wids library")
    p.add_argument("dataset")
    p.set_defaults(run=run_wids_index)

    p = sub.add_parser("show", help="draw a contact sheet (images, captions, mel spectrograms)")
    p.add_argument("dataset")
    p.add_argument("--n", type=positive_int, default=16, help="number of samples")
    p.add_argument("--out", default="sheet.png", help="PNG file to write")
    p.add_argument("--seed", type=int, default=0, help="which samples (0 = the first ones)")
    p.set_defaults(run=run_show)

    p = sub.add_parser("gc", help="remove store entries that no finished dataset in ROOT uses",
                       description="Remove <ROOT>/.store entries (built partitions, and the cached members "
                                   "of each modality) that no finished dataset in ROOT uses. Datasets are never "
                                   "touched; a running preprocess is never disturbed (gc refuses while one runs).")
    p.add_argument("root", help="an output.root of mmdata preprocess (a local folder)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--keep-days", type=non_negative_float, default=0.0,
                   help="keep unused entries written in the last N days (default 0)")
    p.add_argument("--drop-members", action="store_true",
                   help="also remove the member cache that finished datasets were assembled from (frees about "
                        "their size again; the datasets stay whole, but a later change of one modality's "
                        "settings recomputes every modality)")
    p.set_defaults(run=run_gc)
    return parser


def run_preprocess(args) -> int:
    import atexit
    import gc
    from mmdata.config import load_config
    from mmdata import PreprocessConfig, preprocess
    # The command ends with the process: its final garbage collection would walk every object torch made,
    # ~0.4 s of a run that built a few samples in-process. Frozen objects are left to the OS (atexit: not in
    # callers of main() that live on).
    atexit.register(gc.freeze)
    config = load_config(PreprocessConfig, args.config, args.overrides)
    result = preprocess(config)
    print(format_result(result))
    if result.error_rate > config.max_error_rate:
        print(f"error: {result.totals.rejected} of {result.totals.samples_in} samples were rejected "
              f"({result.error_rate:.1%}), over max_error_rate={config.max_error_rate:.1%}; "
              f"see {result.dataset}/errors.jsonl", file=sys.stderr)
        return 1
    return 0


def format_result(result) -> str:
    from mmdata.dataset import lineage_text
    t = result.totals
    rate = t.samples_in / max(result.seconds, 1e-9)
    what = ("reused dataset (nothing to do)" if result.reused_dataset and not result.partitions_built
            else f"{result.partitions_built} partitions built, {result.partitions_reused} reused")
    lines = [
        f"dataset    {result.dataset}",
        f"status     {what}",
        f"samples    {t.written} written, {t.rejected} rejected, {t.samples_in} input",
        "modalities " + (", ".join(f"{m} {n}" for m, n in t.modalities.items()) or "none"),
        "errors     " + (", ".join(f"{r} {n}" for r, n in t.errors_by_reason.items()) or "none"),
        "members    " + (lineage_text(result.lineage) or "none"),
        f"shards     {t.shards}, {t.bytes / 1e6:.1f} MB",
        f"time       {result.seconds:.1f} s, {rate:.0f} samples/s on {result.nodes} node(s), executor {result.executor}",
        "phases     " + ", ".join(f"{k} {v:.1f} s" for k, v in result.phases.items()),
    ]
    return "\n".join(lines)


def run_demo(args) -> int:
    from mmdata.demo import generate_demo
    manifest = generate_demo(args.out, args.n, seed=args.seed, manifest_format=args.format)
    print(f"wrote {args.n} samples; manifest {manifest}")
    return 0


def run_gc(args) -> int:
    from mmdata.prep.store import StoreBusy, collect
    try:
        result = collect(args.root, args.dry_run, args.keep_days, drop_members=args.drop_members)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoreBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verb = "would remove" if args.dry_run else "removed"
    for entry, size in result.removed:
        print(f"{verb} .store/{entry} ({size / 1e6:.1f} MB)")
    print(f"{verb} {len(result.removed)} unused entries, {'would free' if args.dry_run else 'freed'} "
          f"{result.freed / 1e6:.1f} MB; kept {result.in_use} used by {result.datasets} finished datasets"
          + (f" and the {result.members_in_use} member entries they were assembled from" if result.members_in_use
             else "")
          + (f" and {result.recent} written in the last {args.keep_days:g} days" if args.keep_days else ""))
    return 0


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, got {value}")
    return value


def run_info(args) -> int:
    from mmdata.verify import describe
    print(describe(args.dataset))
    return 0


def run_wids_index(args) -> int:
    from mmdata.dataset import write_wids_index
    print(write_wids_index(args.dataset))
    return 0


def run_verify(args) -> int:
    from mmdata.verify import check_dataset
    ok = True
    for dataset in args.dataset:
        report = check_dataset(dataset)
        for problem in report.problems:
            print(problem)
        for note in report.notes:
            print(f"note: {note}")
        print(f"{dataset}: {report.summary()}" if len(args.dataset) > 1 else report.summary())
        ok &= report.ok
    return 0 if ok else 1


def run_show(args) -> int:
    from mmdata.show import contact_sheet
    contact_sheet(args.dataset, args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    entry()
