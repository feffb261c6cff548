#!/usr/bin/env bash
# Trains the two benchmark models of BENCHMARKS.md with examples/run_qa.py from the offline all-MiniLM-L6-v2
# backbone: (a) vanilla QA fine-tuning, (b) Block-Skim joint training. Same data, seed, schedule and settings;
# the only differences are --block_skim and the predictor learning rate (the vanilla model has no predictors).
#
# Both runs go side by side, one CPU thread each, so their train_runtime is a fair training-cost comparison.
#
#   benchmarks/train_models.sh TRAIN_FILE OUTPUT_ROOT [N_EXAMPLES] [EPOCHS]
#
# CPU default: a shuffled subset (seed 42) of N_EXAMPLES=4000 SQuAD v1.1 training questions, 1 epoch, which takes
# about 40 minutes per model on 2 cores. On a GPU pass N_EXAMPLES=all EPOCHS=2 (the full set, the main result).
# BLOCKSKIM_ARGS adds arguments to the Block-Skim run only, e.g. BLOCKSKIM_ARGS="--predictor_question_features true";
# COMMON_ARGS to both runs (later arguments override earlier ones), e.g. the backbone folder and GPU settings.
#
# Then (c): a predictor-only stage on (b) (`--train_predictors_only`: backbone and span head frozen, run as at
# inference), STAGE_EPOCHS=3 epochs over the same questions, written to OUTPUT_ROOT/blockskim_predictors; STAGE_ARGS
# adds arguments, e.g. STAGE_ARGS="--new_skim_predictors true --predictor_question_features true
# --predictor_diagonal_block false" for new question-only predictors. STAGE_EPOCHS=0 skips it.
set -euo pipefail
train_file=${1:?train file (SQuAD v1.1 train JSON)}
root=${2:?output root}
n=${3:-4000}
epochs=${4:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
subset=()
[[ "$n" != all ]] && subset=(--max_train_samples "$n" --train_subset_seed 42)
common=(
  --model_name_or_path minilm --train_file "$train_file" --do_train
  --max_seq_length 384 --doc_stride 128 "${subset[@]}"
  --num_train_epochs "$epochs" --per_device_train_batch_size 16 --learning_rate 1e-4 --warmup_steps 25
  --weight_decay 0.01 --seed 42 --logging_steps 25 --save_strategy steps --save_steps 100 --save_total_limit 1
  --report_to none --disable_tqdm true
)
[[ -z "$(python -c 'import torch; print(torch.cuda.is_available() or "")')" ]] && common+=(--use_cpu true)
# shellcheck disable=SC2206  # COMMON_ARGS is a list of arguments
common+=(${COMMON_ARGS:-})
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$root"
# A run whose folder holds its train_results.json finished before and is not started again (an unfinished one
# resumes from its last checkpoint), so the script can be rerun after an interruption; a run started alone then
# no longer shares the CPU with the other, which its samples/s shows.
finished() { [[ -f "$root/$1/train_results.json" ]] && echo "$1: finished before, not trained again"; }
runs=()
finished vanilla || {
  python "$here/examples/run_qa.py" "${common[@]}" --block_skim false --output_dir "$root/vanilla" \
    > "$root/vanilla.log" 2>&1 &
  runs+=($!)
}
# shellcheck disable=SC2086  # BLOCKSKIM_ARGS is a list of arguments
finished blockskim || {
  python "$here/examples/run_qa.py" "${common[@]}" --block_skim true --skim_predictor_learning_rate 1e-3 \
    ${BLOCKSKIM_ARGS:-} --output_dir "$root/blockskim" > "$root/blockskim.log" 2>&1 &
  runs+=($!)
}
for run in "${runs[@]}"; do wait "$run"; done
grep -h train_samples_per_second "$root"/vanilla/train_results.json "$root"/blockskim/train_results.json
stage_epochs=${STAGE_EPOCHS:-3}
[[ "$stage_epochs" == 0 ]] && exit 0
# Later arguments override the common ones (argparse keeps the last).
# shellcheck disable=SC2086  # STAGE_ARGS is a list of arguments
finished blockskim_predictors || OMP_NUM_THREADS=2 python "$here/examples/run_qa.py" "${common[@]}" \
  --num_train_epochs "$stage_epochs" --model_name_or_path "$root/blockskim" --train_predictors_only true \
  --skim_predictor_learning_rate 1e-3 ${STAGE_ARGS:-} --output_dir "$root/blockskim_predictors" \
  > "$root/blockskim_predictors.log" 2>&1
grep -h train_samples_per_second "$root"/blockskim_predictors/train_results.json
