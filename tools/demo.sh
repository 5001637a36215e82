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

if [[ ! -f demo/word_order/validation.tsv ]]; then
  step "a task that needs context: were two adjacent words of a sentence swapped? (word counts cannot tell)"
  python tools/build_word_order_task.py --corpus demo/corpus/demo.jsonl --output demo/word_order
fi
if [[ ! -f demo/task/validation.tsv ]]; then
  step "a second, easy task: which library is a docstring from? (word counts nearly solve it)"
  python tools/build_demo_task.py --corpus demo/corpus/demo.jsonl --output demo/task
fi

step "pretraining a tiny $MODEL with DeepSpeed on 2 local processes"
rm -rf "runs/${MODEL}_demo"
deepspeed --num_gpus 2 --master_port "${DEMO_PORT:-29511}" --module trainer.pretrain \
  --config "configs/pretrain/${MODEL}_demo.yaml" "$@"

step "converting the pretrained checkpoint (fp32 masters, TP merged) into one native file"
python tools/convert_checkpoint.py --checkpoint "runs/${MODEL}_demo/checkpoints" --format native \
  --output "runs/${MODEL}_demo/native"

# Each task is fine-tuned twice over the same seeds: from the pretrained weights, and from random
# weights of the same architecture and tokenizer (model.random_init=true), the baseline that says
# whether pretraining paid.
finetune() {  # finetune TASK_CONFIG RUN_NAME [overrides]
  local config=$1 name=$2; shift 2
  rm -rf "runs/$name"
  deepspeed --num_gpus 2 --master_port "${DEMO_PORT:-29511}" --module trainer.finetune \
    --config "$config" model.init="runs/${MODEL}_demo/native" run.name="$name" "$@"
}
step "fine-tuning on word order (3 seeds): from the pretrained ${MODEL}, then from random weights"
finetune configs/finetune/word_order.yaml "${MODEL}_demo_word_order"
finetune configs/finetune/word_order.yaml "${MODEL}_demo_word_order_random" model.random_init=true

step "SiFT fine-tuning on the library task (3 seeds): pretrained, then random weights"
finetune configs/finetune/demo.yaml "${MODEL}_demo_finetune"
finetune configs/finetune/demo.yaml "${MODEL}_demo_finetune_random" model.random_init=true

step "summary"
python tools/show_pretraining.py "runs/${MODEL}_demo"
python tools/bow_baseline.py --train demo/word_order/train.tsv --validation demo/word_order/validation.tsv \
  --tokenizer "runs/${MODEL}_demo/tokenizer" | sed 's/^/word order: /'
python tools/compare_finetune.py --task "word order" --pretrained "runs/${MODEL}_demo_word_order" \
  --random-init "runs/${MODEL}_demo_word_order_random"
python tools/bow_baseline.py --train demo/task/train.tsv --validation demo/task/validation.tsv \
  --tokenizer "runs/${MODEL}_demo/tokenizer" | sed 's/^/library: /'
python tools/compare_finetune.py --task "library" --pretrained "runs/${MODEL}_demo_finetune" \
  --random-init "runs/${MODEL}_demo_finetune_random"
