#!/usr/bin/env bash
# GPU check of the trainer and loader (run on a CUDA machine from the repository root, mm importable):
#   demo data -> shards at 64 px and 224 px (local processes: no Ray needed)
#   -> bench-train on CUDA (samples/s, data wait, MFU): the demo model, and a ViT-B/16-sized model
#      (dim 768, 12 layers per encoder, 16 px patches on 224 px images), plain and FSDP2 (one rank)
#   -> a full `mmtrain train` run of the demo experiment with evaluation
#   -> the loader alone against plain webdataset on this machine's cores (when webdataset is importable)
#   -> FSDP2 with two ranks over NCCL (when the machine has two GPUs)
# Each section prints lines prefixed with its name; one that fails prints its error and the next runs.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
STEPS=${STEPS:-100}
BATCH=${BATCH:-256}
PREP="ray.executor=processes progress=false"
section() { sed -u "s|^|$1: |" | tee -a "$OUT/gpu_check.log"; }
keep() { grep --line-buffered -E "^cuda|^cpu|Error|error|rror:" || true; }

python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPUs')" \
  | section env
nproc | sed 's/$/ cores/' | section env
start=$SECONDS
python3 -m mmdata.cli demo-data --out data/demo --n 2000 --seed 0 >/dev/null
python3 -m mmdata.cli preprocess pipelines/demo.yaml $PREP 2>&1 | tail -1 | section preprocess
python3 -m mmdata.cli preprocess pipelines/demo.yaml $PREP image.size=224 output.name=demo224 2>&1 | tail -1 \
  | section preprocess
echo "$((SECONDS - start)) s for demo data and both datasets" | section preprocess

DEMO="data.preprocess_overrides=[ray.executor=processes,progress=false]"
# 2,000 demo samples make 6 batches of 256 per epoch: at most 6 workers have work
python3 benchmarks/bench_train.py --workers 2 4 6 --steps "$STEPS" train.progress=false "$DEMO" \
  data.loader.batch_size="$BATCH" 2>&1 | keep | section "demo model, batch $BATCH"

# ViT-B/16 sized: every encoder 12 layers at dim 768, images 224 px in 16 px patches (196 tokens);
# the demo's learning rate (0.002) sends a model this size to nan within 40 steps
VITB=(optim.lr=0.0002 optim.warmup_steps=10 model.dim=768 model.heads=12 model.text_layers=12 model.image_layers=12 model.audio_layers=12
      model.fusion_layers=2 model.embed_dim=512 model.image_stem=patch model.patch_size=16 model.image_pool=mean
      "data.preprocess_overrides=[ray.executor=processes,progress=false,image.size=224,output.name=demo224]")
python3 benchmarks/bench_train.py --workers 8 --steps 30 train.progress=false "${VITB[@]}" \
  data.loader.batch_size=128 2>&1 | keep | section "ViT-B16 size, batch 128"
python3 benchmarks/bench_train.py --workers 8 --steps 30 train.progress=false "${VITB[@]}" train.fsdp=true \
  data.loader.batch_size=128 2>&1 | keep | section "ViT-B16 size, FSDP2 one rank, batch 128"

start=$SECONDS
python3 -m mmtrain.cli train pipelines/train.yaml train.run_dir="$OUT/run" train.progress=false "$DEMO" \
  data.loader.num_workers=4 2>&1 | grep -vi "warn" | tail -14 | section "make train"
echo "$((SECONDS - start)) s" | section "make train"
cp "$OUT/run/curves.png" "$OUT/run/eval.json" "$OUT/" 2>/dev/null || true

if python3 -c "import webdataset" 2>/dev/null; then
  python3 benchmarks/bench_loader.py --dataset data/datasets/demo224 --workers 8 15 --rounds 3 --samples 4000 \
    2>&1 | tail -5 | section "loader, 224 px"
fi

# FSDP2 with two ranks (NCCL needs one GPU per rank; on CPU the suite runs it with gloo)
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  python3 -m mmtrain.cli train pipelines/train.yaml --nproc 2 train.fsdp=true train.run_dir="$OUT/fsdp2" \
    train.progress=false train.steps=60 train.eval_every=30 train.checkpoint_every=30 "$DEMO" 2>&1 \
    | grep -vi "warn" | tail -6 | section "FSDP2 two ranks"
fi
