#!/usr/bin/env bash
# The CPU headline results of BENCHMARKS.md from scratch, in one command: the models, the benchmarks, the report.
#
#   benchmarks/reproduce.sh TRAIN_FILE DEV_FILE MODELS_ROOT
#
# TRAIN_FILE and DEV_FILE are SQuAD v1.1 train and dev (JSON, .gz too). In order (commands as in BENCHMARKS.md,
# *Reproduce*), on CPU:
#   1. (a) vanilla fine-tuning and (b) Block-Skim joint training on 7,000 training questions, side by side
#      (`train_models.sh`), about 1 hour on 2 cores;
#   2. (m) predictors after layers 0 and 1 trained on the frozen (a), about 20 minutes;
#   3. (n) (m)'s layers 2-5 and span head distilled from (a) on skimmed windows, about 30 minutes;
#   4. the benchmarks of the headline (squad.py on SQuAD v1.1 dev and SQuAD-long 384 and 512, the paired bootstrap
#      intervals of their F1 differences, the batch-1 profile, the oracle-pattern tables), about 3.5 hours;
#   5. report.py, which rewrites the generated parts of BENCHMARKS.md and benchmarks/EXPERIMENTS.md and the plots.
# Results overwrite benchmarks/results/ (RESULTS=DIR writes elsewhere, and then step 5 is left out), so `git diff`
# shows what moved. Rerunning after an interruption loses little: a model whose training finished (its
# train_results.json exists) is not trained again, and run_qa.py resumes an unfinished run from its last checkpoint.
# The GPU figures come from benchmarks/run_gpu.sh.
set -euo pipefail
train=${1:?train file (SQuAD v1.1 train JSON)} dev=${2:?dev file (SQuAD v1.1 dev JSON)} root=${3:?models folder}
here=$(cd "$(dirname "$0")/.." && pwd)
results=${RESULTS:-$here/benchmarks/results}
mkdir -p "$root" "$results"
done_training() { [[ -f "$1/train_results.json" ]] && echo "$1: finished before, not trained again"; }
stage=(
  --train_file "$train" --do_train --max_seq_length 384 --doc_stride 128 --max_train_samples 7000
  --train_subset_seed 42 --per_device_train_batch_size 16 --warmup_steps 25 --seed 42 --use_cpu true
  --disable_tqdm true --logging_steps 50 --report_to none
)

echo "== 1. (a) vanilla and (b) joint training, side by side ($(date -u +%H:%M))"
BLOCKSKIM_ARGS="--predictor_question_features true" STAGE_EPOCHS=0 \
  "$here/benchmarks/train_models.sh" "$train" "$root" 7000
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
echo "== 2. (m) predictors on the frozen vanilla model ($(date -u +%H:%M))"
done_training "$root/vanilla_predictors" || python "$here/examples/run_qa.py" "${stage[@]}" \
  --model_name_or_path "$root/vanilla" --new_skim_predictors true --predictor_question_features true \
  --predictor_diagonal_block false --predictor_block_context true --block_size 16 --predictor_token_matching true \
  --predictor_hidden_size 64 --skim_layers 0 1 --train_predictors_only true --num_train_epochs 3 \
  --learning_rate 1e-4 --skim_predictor_learning_rate 1e-3 --weight_decay 0.01 \
  --output_dir "$root/vanilla_predictors"
echo "== 3. (n) layers 2-5 distilled from the vanilla model on skimmed windows ($(date -u +%H:%M))"
done_training "$root/distilled" || python "$here/examples/run_qa.py" "${stage[@]}" \
  --model_name_or_path "$root/vanilla_predictors" --train_with_skimming true --distill_unskimmed true \
  --skim_threshold 0.2/0.5 --num_train_epochs 2 --learning_rate 5e-5 --weight_decay 0 \
  --output_dir "$root/distilled"

echo "== 4. benchmarks ($(date -u +%H:%M))"
recommended=(
  --vanilla "$root/vanilla" --blockskim "$root/distilled" --joint-training "$root/vanilla"
  --earlier-stages "$root/vanilla_predictors" --skim-layers 0 --dev-file "$dev"
)
squad() { python "$here/benchmarks/squad.py" "$@"; }
squad "${recommended[@]}" --eval-batch-size 64 --timing-features 256 --repeats 5 --thresholds 0.5 0.55 0.6 \
  --output "$results/distilled_layer0_squad_384_cpu.json"
squad "${recommended[@]}" --eval-batch-size 64 --timing-features 128 \
  --thresholds 0.001 0.01 0.05 0.1 0.3 0.5 0.55 0.6 --output "$results/distilled_layer0_grid_squad_384_cpu.json"
for length in 384 512; do
  squad "${recommended[@]}" --eval-batch-size 32 --variant squad-long --max-seq-length "$length" \
    --max-questions 500 --timing-features "$((length == 384 ? 64 : 48))" --thresholds 0.5 0.6 0.7 \
    --output "$results/distilled_layer0_squad_long_${length}_cpu.json"
done
paired() { python "$here/benchmarks/paired_bootstrap.py" --vanilla "$root/vanilla" --blockskim "$root/distilled" \
  --skim-layers 0 --dev-file "$dev" "$@"; }
paired --eval-batch-size 64 --thresholds 0.5 0.6 --output "$results/distilled_layer0_paired_squad_384_cpu.json"
for length in 384 512; do  # the 500 questions of the squad.py tables, then 2,000 (the same 500 first)
  long=(--variant squad-long --max-seq-length "$length")
  paired "${long[@]}" --max-questions 500 --thresholds 0.5 0.6 \
    --output "$results/distilled_layer0_paired_squad_long_${length}_cpu.json"
  paired "${long[@]}" --max-questions 2000 --thresholds 0.5 \
    --output "$results/distilled_layer0_paired_squad_long_${length}_2000q_cpu.json"
done
squad --vanilla "$root/vanilla" --blockskim "$root/blockskim" --skim-layers 1 2 --dev-file "$dev" \
  --eval-batch-size 64 --thresholds 0.001 0.01 0.05 0.1 0.3 0.5 0.6 0.7 0.8 \
  --output "$results/joint_squad_384_cpu.json"
python "$here/benchmarks/overhead_profile.py" --vanilla "$root/vanilla" --blockskim "$root/distilled" \
  --skim-layers 0 --dev-file "$dev" --threshold 0.5 --output "$results/overhead_profile_distilled_layer0_cpu.json"
python "$here/benchmarks/oracle_latency.py" --dev-file "$dev" --save-windows "$root/windows.json" \
  --shapes bert-base bert-large --batch-sizes 1 4 --batch1-windows 4 --repeats 3 --warmup 1 --dtype float32 \
  --output "$results/oracle_latency_cpu.json"
python "$here/benchmarks/oracle_latency.py" --windows "$root/windows.json" --shapes minilm \
  --predictor question-context --block-size 16 --batch-sizes 1 16 --batch1-windows 8 --repeats 5 --warmup 2 \
  --dtype float32 --output "$results/oracle_latency_minilm_context_cpu.json"

if [[ -z "${RESULTS:-}" ]]; then
  echo "== 5. report ($(date -u +%H:%M))"
  python "$here/benchmarks/report.py"
fi
