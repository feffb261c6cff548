"""Questions per second of the Block-Skim question-answering pipeline, skimming on vs off, in one process.

Both modes run on the same model, questions and batch sizes, interleaved within every repeat (the order alternates)
so drifts in clock speed or background load hit both alike; the table reports medians over the repeats. The time
covers the whole pipeline (tokenization, windows, forward, span decoding), which is what a user waits for; the
results are plain Python objects on the host, so GPU work has finished when the clock stops.

Besides the timings, one untimed pass with `return_skim_statistics=True` gives the fraction of token-layers the
skimming model really computed, and the last timed runs give how often skimming changed the answer.

Example:

```bash
python benchmarks/pipeline_throughput.py --model path/to/checkpoint --data ../shared/data/squad/dev-v1.1.json.gz \
    --num-questions 500 --batch-sizes 1 16 --repeats 5 --output benchmarks/results/pipeline_throughput.json
```
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

import modeling_blockskim
from modeling_blockskim import BlockSkimQuestionAnsweringPipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder of a Block-Skim checkpoint with its tokenizer")
    parser.add_argument("--data", required=True, type=Path, help="SQuAD-format JSON, optionally gzip-compressed")
    parser.add_argument("--num-questions", type=int, default=200, help="the first N questions of the file")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="questions per forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per batch size and mode")
    parser.add_argument("--output", type=Path, help="where to write the results JSON")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0; default: the first accelerator, else cpu")
    parser.add_argument("--max-seq-len", type=int, default=384, help="window length in tokens")
    parser.add_argument("--doc-stride", type=int, default=128, help="tokens shared by consecutive windows")
    parser.add_argument("--skim-threshold", type=float, default=None, help="default: the checkpoint's own")
    args = parser.parse_args(argv)
    for name in ("num_questions", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    return args


def load_questions(path: Path, limit: int) -> list[dict[str, str]]:
    """The first `limit` questions of a SQuAD file as `{"question", "context"}` pipeline inputs, in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        articles = json.load(file)["data"]
    questions = [
        {"question": qa["question"], "context": paragraph["context"]}
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    if not questions:
        raise ValueError(f"{path} holds no questions.")
    return questions[:limit]


def timed_run(qa: BlockSkimQuestionAnsweringPipeline, inputs: list[dict[str, str]], **call) -> tuple[float, list]:
    """Seconds for one pipeline call over all inputs, and its answers."""
    if qa.device.type == "cuda":
        torch.cuda.synchronize(qa.device)
    start = time.perf_counter()
    answers = qa(inputs, **call)
    return time.perf_counter() - start, answers


def kept_token_fraction(qa: BlockSkimQuestionAnsweringPipeline, inputs: list[dict[str, str]], **call) -> float:
    """Token-layers computed with skimming / token-layers without it (1.0 = nothing skimmed)."""
    answers = qa(inputs, skim=True, return_skim_statistics=True, **call)
    kept = sum(sum(answer["skim_statistics"]["kept_tokens_per_layer"]) for answer in answers)
    full = sum(
        answer["skim_statistics"]["input_tokens"] * len(answer["skim_statistics"]["kept_tokens_per_layer"])
        for answer in answers
    )
    return kept / full


def environment(qa: BlockSkimQuestionAnsweringPipeline) -> dict[str, Any]:
    """Versions, device and git revision, so a results file says what produced it."""
    repository = Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repository, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], cwd=repository, capture_output=True, text=True).stdout
        )
    except (OSError, subprocess.CalledProcessError):
        revision, dirty = None, None
    device = qa.device
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "blockskim": modeling_blockskim.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "git_revision": revision,
        "git_dirty": dirty,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    inputs = load_questions(args.data, args.num_questions)
    model = AutoModelForQuestionAnswering.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    qa = BlockSkimQuestionAnsweringPipeline(model=model, tokenizer=tokenizer, device=args.device)
    if not qa.supports_skim:
        raise SystemExit(f"{args.model} is not a Block-Skim checkpoint: there is no skimming to compare.")
    call = {"max_seq_len": args.max_seq_len, "doc_stride": args.doc_stride}
    if args.skim_threshold is not None:
        call["skim_threshold"] = args.skim_threshold

    results = []
    agreement = {}
    for batch_size in args.batch_sizes:
        warmup = inputs[: 2 * batch_size]
        for skim in (True, False):
            qa(warmup, batch_size=batch_size, skim=skim, **call)
        seconds: dict[bool, list[float]] = {True: [], False: []}
        answers: dict[bool, list] = {}
        for repeat in range(args.repeats):
            for skim in (True, False) if repeat % 2 == 0 else (False, True):
                elapsed, answers[skim] = timed_run(qa, inputs, batch_size=batch_size, skim=skim, **call)
                seconds[skim].append(elapsed)
        pairs = zip(answers[True], answers[False], strict=True)
        agreement[batch_size] = sum((a["start"], a["end"]) == (b["start"], b["end"]) for a, b in pairs) / len(inputs)
        for skim in (False, True):
            throughput = [len(inputs) / elapsed for elapsed in seconds[skim]]
            results.append(
                {
                    "batch_size": batch_size,
                    "skim": skim,
                    "questions_per_second_median": statistics.median(throughput),
                    "questions_per_second": throughput,
                    "seconds": seconds[skim],
                }
            )

    report = {
        "experiment": "pipeline_throughput",
        "model": args.model,
        "data": str(args.data),
        "num_questions": len(inputs),
        "repeats": args.repeats,
        "call": call,
        "skim_threshold": args.skim_threshold if args.skim_threshold is not None else model.config.skim_threshold,
        "kept_token_fraction": kept_token_fraction(qa, inputs, batch_size=max(args.batch_sizes), **call),
        "same_answer_fraction": agreement,
        "results": results,
        "environment": environment(qa),
    }
    print_table(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return report


def print_table(report: dict[str, Any]) -> None:
    """Median questions/s per batch size, skimming off vs on, and the ratio."""
    medians = {(row["batch_size"], row["skim"]): row["questions_per_second_median"] for row in report["results"]}
    print(
        f"{report['num_questions']} questions, {report['repeats']} repeats, device {report['environment']['device']}, "
        f"skim_threshold {report['skim_threshold']}, kept token-layers {report['kept_token_fraction']:.1%}"
    )
    print(f"{'batch size':>10} | {'skim off q/s':>12} | {'skim on q/s':>11} | {'speedup':>7} | {'same answer':>11}")
    for batch_size in sorted({batch for batch, _ in medians}):
        off, on = medians[(batch_size, False)], medians[(batch_size, True)]
        same = report["same_answer_fraction"][batch_size]
        print(f"{batch_size:>10} | {off:>12.2f} | {on:>11.2f} | {on / off:>6.2f}x | {same:>11.1%}")


if __name__ == "__main__":
    main()
