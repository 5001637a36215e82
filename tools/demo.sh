#!/usr/bin/env bash
# The demo pipeline on the embedded corpus: corpus -> tokenizer -> indexed binaries -> 2-rank DeepSpeed
# pretraining -> conversion -> 2-rank SiFT fine-tuning on a labelled task made from the same corpus.
# DEMO_MODEL=deberta_v3 (default: SentencePiece, replaced token detection, GDES) or roberta (byte-level
# BPE, MLM). Data stages are skipped when their output exists; training starts fresh. Arguments are
# overrides for the pretraining run (e.g. train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS="ignore"
MODEL="${DEMO_MODEL:-deberta_v3}"

step() { printf '\n==> %s\n' "$*"; }

case "$MODEL" in
  deberta_v3) TYPE=spm; TOK=demo/spm; PREFIX=demo/bin/spm_corpus ;;
  roberta)    TYPE=bpe; TOK=demo/tok; PREFIX=demo/bin/corpus ;;
  *) echo "error: DEMO_MODEL must be deberta_v3 or roberta, got '$MODEL'" >&2; exit 2 ;;
esac

if [[ ! -s demo/corpus/demo.jsonl ]]; then
  step "building the embedded corpus (docstrings of the installed Python packages)"
  python tools/build_demo_corpus.py --output demo/corpus/demo.jsonl
fi
if [[ ! -f "$TOK/tokenizer.json" ]]; then
  step "training a $TYPE tokenizer"
  python tools/train_tokenizer.py --input demo/corpus/demo.jsonl --type "$TYPE" --vocab-size 8000 --output "$TOK"
fi
if [[ ! -f "$PREFIX.idx" ]]; then
  step "preprocessing into a megatron-core IndexedDataset"
  python tools/preprocess_data.py --input demo/corpus/demo.jsonl --tokenizer "$TOK" --output-prefix "$PREFIX" --workers 2
fi

step "pretraining a tiny $MODEL with DeepSpeed on 2 local processes"
rm -rf "runs/${MODEL}_demo"
deepspeed --num_gpus 2 --master_port "${DEMO_PORT:-29511}" --module trainer.pretrain \
  --config "configs/pretrain/${MODEL}_demo.yaml" "$@"

step "converting the pretrained checkpoint (fp32 masters, TP merged) into one native file"
python tools/convert_checkpoint.py --checkpoint "runs/${MODEL}_demo/checkpoints" --format native \
  --output "runs/${MODEL}_demo/native"

if [[ ! -f demo/task/validation.tsv ]]; then
  step "a labelled task from the corpus: which library is a docstring from?"
  python tools/build_demo_task.py --corpus demo/corpus/demo.jsonl --output demo/task
fi

step "SiFT fine-tuning of the pretrained ${MODEL} on 2 local processes"
rm -rf "runs/${MODEL}_demo_finetune"
deepspeed --num_gpus 2 --master_port "${DEMO_PORT:-29511}" --module trainer.finetune \
  --config configs/finetune/demo.yaml model.init="runs/${MODEL}_demo/native" run.name="${MODEL}_demo_finetune"
