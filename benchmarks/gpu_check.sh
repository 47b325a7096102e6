#!/usr/bin/env bash
# GPU check of the trainer and loader (run on a CUDA machine from the repo root, mm importable):
# demo data -> shards (serial executor: no Ray needed) -> bench-train on CUDA (samples/s, data wait,
# MFU) for DDP/plain and FSDP2 -> a full `mmtrain train` run with evaluation.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
SERIAL="data.preprocess_overrides=[ray.executor=serial,progress=false]"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m mmdata.cli demo-data --out data/demo --n 2000 --seed 0 >/dev/null
python3 -m mmdata.cli preprocess pipelines/demo.yaml ray.executor=serial progress=false | tail -3
for workers in 2 4 8; do
  python3 benchmarks/bench_train.py --workers $workers --steps 100 train.progress=false "$SERIAL" data.loader.batch_size=${BATCH:-256} 2>&1 | grep -E "^cuda|Error|error" || true
done
python3 benchmarks/bench_train.py --workers 4 --steps 100 train.progress=false "$SERIAL" train.fsdp=true \
  data.loader.batch_size=${BATCH:-256} 2>&1 | grep -E "^cuda|Error|error" | sed 's/^/fsdp2 /' || true
python3 -m mmtrain.cli train pipelines/train.yaml train.run_dir="$OUT/run" train.progress=false "$SERIAL" \
  data.loader.num_workers=4 2>&1 | grep -vi "warn" | tail -24
cp "$OUT/run/curves.png" "$OUT/run/eval.json" "$OUT/" 2>/dev/null || true
# FSDP2 with two ranks (NCCL needs one GPU per rank; on CPU the suite runs it with gloo)
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  python3 -m mmtrain.cli train pipelines/train.yaml --nproc 2 train.fsdp=true train.run_dir="$OUT/fsdp2" \
    train.progress=false train.steps=60 train.eval_every=30 train.checkpoint_every=30 "$SERIAL" 2>&1 \
    | grep -vi "warn" | tail -6 | sed 's/^/fsdp2 x2 /'
fi
