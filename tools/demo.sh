#!/usr/bin/env bash
# The demo pipeline on the embedded corpus: corpus -> tokenizer -> indexed binaries -> 2-rank DeepSpeed
# pretraining of a tiny RoBERTa. Data stages are skipped when their output exists; training starts fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS="ignore"

step() { printf '\n==> %s\n' "$*"; }

if [[ ! -s demo/corpus/demo.jsonl ]]; then
  step "building the embedded corpus (docstrings of the installed Python packages)"
  python tools/build_demo_corpus.py --output demo/corpus/demo.jsonl
fi
if [[ ! -f demo/tok/tokenizer.json ]]; then
  step "training a byte-level BPE tokenizer"
  python tools/train_tokenizer.py --input demo/corpus/demo.jsonl --type bpe --vocab-size 8000 --output demo/tok
fi
if [[ ! -f demo/bin/corpus.idx ]]; then
  step "preprocessing into a megatron-core IndexedDataset"
  python tools/preprocess_data.py --input demo/corpus/demo.jsonl --tokenizer demo/tok \
    --output-prefix demo/bin/corpus --workers 2
fi

step "pretraining a tiny RoBERTa with DeepSpeed on 2 local processes"
rm -rf runs/roberta_demo
deepspeed --num_gpus 2 --master_port "${DEMO_PORT:-29511}" --module trainer.pretrain \
  --config configs/pretrain/roberta_demo.yaml "$@"
