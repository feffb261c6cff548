"""Regenerate the tables and plots of BENCHMARKS.md and benchmarks/EXPERIMENTS.md from `benchmarks/results/*.json`.

The headline results (the recommended setting, the paper's joint training, the GPU table and its CPU counterparts:
`HEADLINE_RESULTS`) go to BENCHMARKS.md with the plots; every other result, the studies that led there, goes to
EXPERIMENTS.md. In each file only the part between `<!-- results:begin -->` and `<!-- results:end -->` is
rewritten; the prose around it is kept. Plots go to `benchmarks/plots/`.

    python benchmarks/report.py                      # results/ -> BENCHMARKS.md, EXPERIMENTS.md + plots
    python benchmarks/report.py --results DIR --markdown FILE --experiments FILE --plots DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

HEADLINE_RESULTS = (
    "distilled_layer0_",
    "joint_squad_384_",
    "overhead_profile_distilled_layer0_",
    "oracle_latency_",
)
"""Name prefixes of the results BENCHMARKS.md shows, in this order: model (n) skimming with its layer-0 predictor
(the recommended setting) on every data set, model (b) (joint training as in the paper), the recommended setting's
batch-1 profile, and the oracle-pattern tables of the GPU target. Their SQuAD results are plotted."""


def _title(result: dict[str, Any]) -> str:
    setup = result["setup"]
    name = (
        "SQuAD v1.1 dev" if result["variant"] == "squad" else f"SQuAD-long ({setup['paragraphs_joined']} paragraphs)"
    )
    subset = f", random subset of {setup['questions']} questions" if setup.get("max_questions") else ""
    layers = setup.get("skim_layers") or []
    plural = "s" if len(layers) > 1 else ""
    skimming = f"; skimming after layer{plural} {', '.join(map(str, layers))}" if layers else ""
    return f"{name}, max_seq_length {setup['max_seq_length']}{subset}; {_predictor(result)}{skimming}"


def _predictor(result: dict[str, Any]) -> str:
    """Which skim predictor the Block-Skim model has (results written before an option existed: its default)."""
    setup = result["setup"]
    if not setup.get("predictor_diagonal_block", True):
        kind = "linear predictors of the block-question attention only"
        if setup.get("predictor_block_context", False):
            kind += ", in context (log-ratios, neighbouring blocks, gap to the best block)"
        if setup.get("predictor_token_matching", False):
            kind += ", with token matching on the hidden states"
        if setup.get("predictor_hidden_size"):
            kind = kind.replace("linear predictors", f"predictors with {setup['predictor_hidden_size']} hidden units")
    elif setup.get("predictor_question_features", False):
        kind = "predictors read the diagonal attention square and the block-question attention"
    else:
        kind = "predictors read the diagonal attention square only (the paper's)"
    if setup.get("joint_training"):
        on_vanilla = setup["joint_training"] == setup.get("vanilla")
        kind += f", trained alone on the frozen {'vanilla' if on_vanilla else 'jointly trained'} model"
        if (result.get("training") or {}).get("later_stages"):
            kind += ", the layers after them tuned in a later stage (*Setup*)"
    if "block_size" in setup:
        kind += f"; blocks of {setup['block_size']} tokens"
    return kind


def _label(name: str) -> str:
    return {"vanilla": "vanilla (baseline)", "blockskim_no_skim": "Block-Skim, no skimming"}.get(
        name, name.replace("blockskim_tau=", "Block-Skim, τ = ")
    )


def accuracy_table(result: dict[str, Any]) -> str:
    batch_sizes = list(result["timing"])
    head = (
        "| model | EM | F1 | GFLOPs/question | FLOPs × vs dynamic | FLOPs × vs padded | Eq. 4 ideal × | "
        + " | ".join(f"wall × b{b} (vs dyn / vs padded) | efficiency b{b}" for b in batch_sizes)
        + " |"
    )
    lines = [head, "|" + "---|" * (7 + 2 * len(batch_sizes))]
    for name, row in result["rows"].items():
        cells = [
            _label(name),
            f"{row['exact_match']:.2f}",
            f"{row['f1']:.2f}",
            f"{row['flops_per_question'] / 1e9:.2f}",
            f"{row['flops_speedup_vs_dynamic']:.2f}",
            f"{row['flops_speedup_vs_padded']:.2f}",
            f"{row['ideal_speedup_eq4']:.2f}",
        ]
        for batch_size in batch_sizes:
            entry = result["timing"][batch_size]["rows"][name]
            cells.append(f"{entry['speedup_vs_dynamic']:.2f} / {entry['speedup_vs_padded']:.2f}")
            cells.append(f"{entry['implementation_efficiency']:.2f}" if "implementation_efficiency" in entry else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(result: dict[str, Any]) -> str:
    lines = [
        "| batch | model | ms / window | × vs dynamic | × vs padded | ideal truncation ms | ideal × vs dynamic "
        "| efficiency | wall ÷ FLOPs speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for batch_size, timing in result["timing"].items():
        lines.append(
            f"| {batch_size} | vanilla padded to {result['setup']['max_seq_length']} | "
            f"{timing['vanilla_padded_ms_per_window']:.2f} | | 1.00 | | | | |"
        )
        for name, entry in timing["rows"].items():
            cells = [batch_size, _label(name), f"{entry['ms_per_window']:.2f}", f"{entry['speedup_vs_dynamic']:.2f}"]
            cells.append(f"{entry['speedup_vs_padded']:.2f}")
            ideal_keys = ("ideal_truncation_ms_per_window", "ideal_truncation_speedup_vs_dynamic")
            cells += [
                f"{entry[key]:.2f}" if key in entry else "" for key in (*ideal_keys, "implementation_efficiency")
            ]
            cells.append(f"{entry['wall_over_flops_speedup']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_table(result: dict[str, Any]) -> str:
    layers = len(next(iter(result["rows"].values()))["kept_token_fraction_per_layer"])
    lines = [
        "| model | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
        "|---|" + "---|" * layers,
    ]
    for name, row in result["rows"].items():
        if name.startswith("blockskim_tau"):
            fractions = " | ".join(f"{value:.3f}" for value in row["kept_token_fraction_per_layer"])
            lines.append(f"| {_label(name)} | {fractions} |")
    return "\n".join(lines)


def oracle_line(result: dict[str, Any]) -> str:
    """`oracle.after_layer_k` counts the layers that read the whole window; predictor layers are indices from 0, so
    the bound for a predictor at index i is the one after i + 1 layers, and the line says so."""
    parts = []
    for key, value in result["oracle"].items():
        layers = int(key.rsplit("_", 1)[-1])
        parts.append(
            f"after {layers} layer{'s' if layers > 1 else ''} (a predictor at layer {layers - 1}): "
            f"{value['flops_speedup_vs_dynamic']:.2f}× vs dynamic ({value['flops_speedup_vs_padded']:.2f}× vs padded)"
        )
    return "Oracle bound (keep [CLS], question, separators and gold-answer blocks only): " + "; ".join(parts) + "."


def provenance(result: dict[str, Any]) -> str:
    env, setup = result["environment"], result["setup"]
    deviation = max(result["flop_counter_worst_deviation"].values())
    return (
        f"{setup['questions']} questions / {setup['windows']} windows (mean {setup['mean_window_length']:.0f}, median "
        f"{setup['median_window_length']} tokens); wall-clock on {setup['timing_windows']} seeded windows, median of "
        f"{setup['timing_repeats']} interleaved repeats after {setup['timing_warmup']} warm-up; {env['device']} "
        f"({env['processor']}, {env['torch_threads']} threads), torch {env['torch']}, transformers "
        f"{env['transformers']}, {setup['dtype']}, {env['date']}, revision `{env['git_revision']}`. FLOP counter vs "
        f"analytic count: worst deviation {100 * deviation:.2f} %. Command: `{env['command']}`"
    )


def _model_label(result: dict[str, Any]) -> str:
    """What tells two headline results on one data set apart: the model folder and the predictor layers used."""
    layers = ",".join(str(layer) for layer in result["setup"]["skim_layers"])
    return f"{Path(result['setup']['blockskim']).name} (layers {layers})"


def _data_label(result: dict[str, Any]) -> str:
    """The data set and window length in a few words, for plot titles."""
    name = "SQuAD v1.1 dev" if result["variant"] == "squad" else "SQuAD-long"
    return f"{name} {result['setup']['max_seq_length']}"


def plot(results: list[tuple[str, dict[str, Any]]], plots: Path) -> list[str]:
    """The Pareto curves and kept fractions of the headline results.

    One row of panels per data set and window length, so that SQuAD's F1 (about 61) and SQuAD-long's (about 44)
    each get their own scale; the model and its predictor layers tell the curves of a row apart (*Setup* of
    BENCHMARKS.md describes each model), one curve each.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    curves: dict[str, dict[str, dict[str, Any]]] = {}  # data label -> model label -> the result drawn
    for _stem, result in results:
        drawn = curves.setdefault(_data_label(result), {})
        label = _model_label(result)
        # Two runs of one model and layer set on one data set (a τ grid and a retiming): the one with more τ.
        if label not in drawn or len(result["rows"]) > len(drawn[label]["rows"]):
            drawn[label] = result
    groups = {data: list(drawn.values()) for data, drawn in curves.items()}
    figure, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for row_axes, (data, members) in zip(axes, groups.items(), strict=True):
        for result in members:
            rows = result["rows"]
            taus = [name for name in rows if name.startswith("blockskim_tau")]
            batch = list(result["timing"])[-1]
            for axis, xs, title in (
                (row_axes[0], [rows[name]["flops_speedup_vs_dynamic"] for name in taus], "FLOPs speedup"),
                (
                    row_axes[1],
                    [result["timing"][batch]["rows"][name]["speedup_vs_dynamic"] for name in taus],
                    f"CPU wall-clock speedup at batch {batch}",
                ),
            ):
                ys = [rows[name]["f1"] for name in taus]
                axis.plot(xs, ys, marker="o", label=_model_label(result))
                for x, y, name in zip(xs, ys, taus, strict=True):
                    axis.annotate(name.split("=")[1], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
                axis.set_title(f"{data}: {title} vs dynamic padding", fontsize=9)
        vanilla = sorted({round(result["rows"]["vanilla"]["f1"], 2) for result in members})
        for axis in row_axes:
            for f1 in vanilla:
                axis.axhline(f1, color="grey", linestyle="--", linewidth=0.8)
            axis.set_xlabel("speedup (×)")
            axis.set_ylabel("F1 (dashed: vanilla)")
            axis.legend(fontsize=7, loc="lower left")
    figure.suptitle("F1 against speedup over τ (point labels: τ per predictor layer)", fontsize=10)
    figure.tight_layout()
    path = plots / "f1_vs_speedup.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    columns = max(len(members) for members in groups.values())
    figure, axes = plt.subplots(
        len(groups), columns, figsize=(4 * columns, 3.4 * len(groups)), squeeze=False, sharey=True
    )
    for row_axes, (data, members) in zip(axes, groups.items(), strict=True):
        for axis in row_axes[len(members) :]:
            axis.set_visible(False)
        for axis, result in zip(row_axes, members, strict=False):
            for name, row in result["rows"].items():
                if name.startswith("blockskim_tau"):
                    fractions = row["kept_token_fraction_per_layer"]
                    axis.plot(range(len(fractions)), fractions, marker="o", label=name.replace("blockskim_", ""))
            axis.set_title(f"{data}\n{_model_label(result)}", fontsize=8)
            axis.set_xlabel("layer")
            axis.set_ylabel("kept-token fraction")
            axis.set_ylim(0, 1.05)
            axis.legend(fontsize=6)
    figure.tight_layout()
    path = plots / "kept_fraction_per_layer.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
    return [str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path) for path in written]


def _tau(threshold: float | list[float]) -> str:
    """One tau for every predictor layer, or one per layer (in the order of the layer set) joined by " / "."""
    return " / ".join(f"{tau:g}" for tau in (threshold if isinstance(threshold, list) else [threshold]))


def layer_sweep_section(stem: str, sweep: dict[str, Any]) -> str:
    """The (predictor layers, tau) sweep of `benchmarks/predictor_layers.py`: accuracy against FLOPs, and (in files
    that record it) where the F1 change against the model without skimming comes from."""
    setup, rows = sweep["setup"], sweep["rows"]
    vanilla = rows["vanilla"]
    unskimmed = rows.get("blockskim_no_skim")
    # The checkpoint's path tells apart sweeps of two checkpoints whose predictors are of one kind.
    checkpoint = f"model `{setup['blockskim']}`"
    model = f"{_predictor(sweep)}, {checkpoint}" if "predictor_diagonal_block" in setup else checkpoint
    header = "| predictor layers | τ | EM | F1 | F1 − vanilla | FLOPs × vs dynamic | FLOPs × vs padded |"
    source = (
        f"Source: `benchmarks/results/{stem}.json`, command `{sweep['environment']['command']}`. Vanilla on the same "
        f"questions: EM {vanilla['exact_match']:.2f}, F1 {vanilla['f1']:.2f}."
    )
    if unskimmed is not None:
        header += " answer cut: questions, F1 change | answer kept: F1 change |"
        source += (
            f" Block-Skim without skimming: EM {unskimmed['exact_match']:.2f}, F1 {unskimmed['f1']:.2f}. *Answer "
            "cut*: questions whose answer without skimming lost a token to skimming, and their share of the F1 "
            "change against the model without skimming; *answer kept*: the share of the other questions."
        )
    data = (
        f"SQuAD-long ({setup['paragraphs']} paragraphs) dev" if setup.get("variant") == "squad-long" else "dev"
    )  # files before the SQuAD-long option name no variant: SQuAD v1.1
    lines = [
        f"### Choice of predictor layers and τ, {model} ({setup['max_questions']} seeded {data} questions, "
        f"max_seq_length {setup['max_seq_length']}, no timing)",
        source,
        header + "\n" + "|---" * header.count(" | ") + "|---|",
    ]
    table = []
    for name, row in rows.items():
        if name in ("vanilla", "blockskim_no_skim"):
            continue
        cells = (
            f"| {', '.join(map(str, row['skim_layers']))} | {_tau(row['threshold'])} | {row['exact_match']:.2f} | "
            f"{row['f1']:.2f} | {row['f1'] - vanilla['f1']:+.2f} | {row['flops_speedup_vs_dynamic']:.2f} | "
            f"{row['flops_speedup_vs_padded']:.2f} |"
        )
        if unskimmed is not None:
            cells += (
                f" {row['questions_answer_cut']}, {row['f1_change_answer_cut']:+.2f} | "
                f"{row['f1_change_answer_kept']:+.2f} |"
            )
        table.append(cells)
    lines[-1] += "\n" + "\n".join(table)
    return "\n\n".join(lines)


def probe_section(stem: str, probe: dict[str, Any]) -> str:
    """The offline predictor probes of `benchmarks/predictor_probe.py`: how well each signal finds answer blocks."""
    setup = probe["setup"]
    data = "SQuAD-long" if probe["variant"] == "squad-long" else "SQuAD v1.1"
    lines = [
        f"### What a predictor after layer {setup['layer']} can tell: offline probes of `{setup['blockskim']}` "
        f"({data} dev, max_seq_length {setup['max_seq_length']})",
        f"Source: `benchmarks/results/{stem}.json`, command `{probe['environment']['command']}`. Probes fitted on "
        f"the {setup['train_judged_blocks']} passage blocks of {setup['max_train_questions']} training questions, "
        f"scored on {setup['dev_judged_blocks']} dev passage blocks ({setup['dev_answer_blocks']} hold the answer). "
        "*Rejected at recall r*: the share of answer-free passage blocks below the threshold that keeps a share r "
        "of the answer blocks.",
    ]
    recalls = [key.removeprefix("rejected_at_recall_") for key in next(iter(probe["rows"].values())) if key != "auc"]
    lines.append(
        "| probe | AUC | "
        + " | ".join(f"rejected at recall {r}" for r in recalls)
        + " |\n"
        + "|---" * (2 + len(recalls))
        + "|\n"
        + "\n".join(
            f"| {name} | {row['auc']:.3f} | "
            + " | ".join(f"{row[f'rejected_at_recall_{r}']:.3f}" for r in recalls)
            + " |"
            for name, row in probe["rows"].items()
        )
    )
    at_threshold = probe["trained_predictor_at_threshold"]
    lines.append(
        "The checkpoint's own predictor at each τ (compare the F1 of the same τ above):\n\n"
        "| τ | answer blocks kept | answer-free blocks rejected |\n|---|---|---|\n"
        + "\n".join(
            f"| {tau} | {row['answer_block_recall']:.3f} | {row['rejected']:.3f} |"
            for tau, row in at_threshold.items()
        )
    )
    return "\n\n".join(lines)


def overhead_section(stem: str, profile: dict[str, Any]) -> str:
    """`benchmarks/overhead_profile.py`: Block-Skim's batch-1 time against the ideal truncation's, region by region."""
    setup = profile["setup"]
    tau = setup["threshold"]  # a float in profiles before per-layer tau, else its label ("0.5/0.8")
    tau = f"{tau:g}" if isinstance(tau, float) else tau
    windows = "SQuAD-long dev windows" if setup.get("variant") == "squad-long" else "dev windows"
    lines = [
        f"### Where the batch-1 time goes: `{setup['blockskim']}`, τ = {tau}, against the ideal truncation, region "
        f"by region ({setup['windows']} {windows}, max_seq_length {setup['max_seq_length']})",
        f"Source: `benchmarks/results/{stem}.json`, command `{profile['environment']['command']}` (revision "
        f"`{profile['environment']['git_revision']}`). Per window, sum over the windows of each region's median of "
        f"{setup['repeats']} interleaved runs; hooks stamp the time around every layer in both models.",
        "| region | Block-Skim ms | ideal truncation ms | extra ms |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {row['region']} | {row['blockskim_ms']:.3f} | {row['ideal_ms']:.3f} | {row['extra_ms']:+.3f} |"
            for row in profile["regions"]
        )
        + f"\n| **total** | {profile['blockskim_ms_per_window']:.3f} | {profile['ideal_ms_per_window']:.3f} | "
        f"{profile['blockskim_ms_per_window'] - profile['ideal_ms_per_window']:+.3f} |",
        f"Implementation efficiency on these windows: {profile['implementation_efficiency']:.3f}."
        + _operators_sentence(profile),
    ]
    functions = profile.get("functions_ms_per_window")
    if functions is not None:  # profiles that clocked Block-Skim's own functions
        extra = profile["blockskim_ms_per_window"] - profile["ideal_ms_per_window"]
        kept = ", ".join(f"{fraction:.3f}" for fraction in profile["kept_token_fraction_per_layer"])
        lines.append(
            "Where the extra time goes, by Block-Skim's own functions (none runs in the ideal truncation; the rest "
            "is the layers' share, such as the attention call that also returns the log-sum-exp, and Python "
            f"glue). Tokens each layer reads, as a fraction of the real tokens: {kept}.\n\n"
            "| part | ms per window | share of the extra |\n|---|---|---|\n"
            + "\n".join(
                f"| {part} | {milliseconds:.3f} | {milliseconds / extra:.0%} |"
                for part, milliseconds in functions.items()
            )
            + f"\n| the rest | {extra - sum(functions.values()):.3f} | "
            f"{(extra - sum(functions.values())) / extra:.0%} |"
        )
    return "\n\n".join(lines)


def _operators_sentence(profile: dict[str, Any]) -> str:
    """How many more ATen operators Block-Skim dispatches per window, and the extra time per extra operator (in
    profiles that counted them)."""
    operators = profile.get("operators_per_window")
    if operators is None:
        return ""
    extra_operators = operators["blockskim"] - operators["ideal"]
    extra_ms = profile["blockskim_ms_per_window"] - profile["ideal_ms_per_window"]
    per_operator = (
        f", {1000 * extra_ms / extra_operators:.1f} µs of extra time per extra operator" if extra_operators > 0 else ""
    )
    return (
        f" ATen operators dispatched per window: Block-Skim {operators['blockskim']:.0f}, ideal truncation "
        f"{operators['ideal']:.0f}{per_operator}."
    )


def oracle_latency_section(stem: str, table: dict[str, Any]) -> str:
    """`benchmarks/oracle_latency.py`: the oracle keep pattern on standard shapes, against the ideal truncation."""
    setup, environment = table["setup"], table["environment"]
    device = (
        environment.get("gpu") or f"CPU ({environment['cpu_count']} cores, {environment['torch_threads']} threads)"
    )
    shapes = " and ".join(dict.fromkeys(row["shape"] for row in table["rows"]))
    lines = [
        f"### Oracle keep pattern on {shapes} shapes: {device}, {setup['dtype']}, random weights, "
        f"{setup.get('predictor', 'paper')} predictors, blocks of {setup['block_size']}"
        + (
            ""
            if setup.get("compile", "none") == "none"
            else f', every variant `torch.compile(mode="{setup["compile"]}")`'
        ),
        f"Source: `benchmarks/results/{stem}.json`, command `{environment['command']}` (revision "
        f"`{environment['git_revision']}`, torch {environment['torch']}). {setup['variant']}; {setup['pattern']}; "
        f"ms per forward; batch 1 = the mean over {setup['batch1_windows']} windows run one by one, larger batches "
        f"one batch; medians of {setup['repeats']} interleaved runs after {setup['warmup']} warm-up. × = speedup "
        "over the stock model "
        "(dynamic padding = padded here: the windows are full); efficiency = T(ideal truncation) / T(Block-Skim); "
        "ops = ATen operators dispatched per forward, syncs = host synchronisations per forward (vanilla / ideal / "
        "first-layer / all layers; – where a run did not record them).",
    ]
    head = (
        "| shape | tokens | batch | vanilla ms | ideal truncation ms (×) | Block-Skim, predictor after the first "
        "layer: ms (×, efficiency) | Block-Skim, predictors after every layer: ms (×, efficiency) | FLOPs × | ops | "
        "syncs |"
    )
    rows = [head, "|" + "---|" * 10]
    for row in table["rows"]:
        forwards = row["windows"] // row["batch_size"]  # batch 1 sums the medians of several windows
        ms = {name: value / forwards for name, value in row["latency_ms"].items()}
        cells_counts = [
            " / ".join(
                f"{counts[name]:.0f}"
                for name in ("vanilla", "ideal_truncation", "blockskim_first_layer", "blockskim_all_layers")
            )
            if counts
            else "–"
            for counts in (row.get("aten_operators_per_forward"), row.get("host_syncs_per_forward"))
        ]
        cells = [
            row["shape"],
            str(row["seq_len"]),
            str(row["batch_size"]),
            f"{ms['vanilla']:.2f}",
            f"{ms['ideal_truncation']:.2f} (×{row['ideal_truncation_speedup_vs_vanilla']:.2f})",
        ]
        for name in ("blockskim_first_layer", "blockskim_all_layers"):
            variant = row[name]
            cells.append(
                f"{ms[name]:.2f} (×{variant['latency_speedup_vs_vanilla']:.2f}, "
                f"{variant['implementation_efficiency']:.3f})"
            )
        cells += [f"{row['blockskim_first_layer']['flops_speedup_vs_vanilla']:.2f}", *cells_counts]
        rows.append("| " + " | ".join(cells) + " |")
    lines.append("\n".join(rows))
    return "\n\n".join(lines)


def paired_bootstrap_section(stem: str, result: dict[str, Any]) -> str:
    """`benchmarks/paired_bootstrap.py`: each Block-Skim row's EM/F1 difference from vanilla, with its interval."""
    setup, env = result["setup"], result["environment"]
    layers = ", ".join(map(str, setup["skim_layers"]))
    subset = "random subset of " if setup.get("max_questions") else ""
    lines = [
        f"### How sure the differences are: {_data_label(result)}, {subset}{setup['questions']} questions; "
        f"`{setup['blockskim']}` skimming after layer {layers}, against `{setup['vanilla']}`",
        f"Source: `benchmarks/results/{stem}.json`, command `{env['command']}` (revision `{env['git_revision']}`, "
        f"{setup['dtype']}). Δ = Block-Skim − vanilla on the same questions, with the 95% interval of a paired "
        f"bootstrap over the questions ({setup['resamples']} resamples); up / down = questions whose F1 rose / fell.",
    ]
    rows = ["| model | EM | F1 | Δ EM [95% interval] | Δ F1 [95% interval] | F1 up / down |", "|" + "---|" * 6]
    for name, row in result["rows"].items():
        cells = [_label(name), f"{row['exact_match']:.2f}", f"{row['f1']:.2f}"]
        versus = row.get("vs_vanilla")
        if versus is None:
            cells += ["", "", ""]
        else:
            for metric in ("exact_match", "f1"):
                low, high = versus[f"{metric}_ci95"]
                cells.append(f"{versus[f'{metric}_difference']:+.2f} [{low:+.2f}, {high:+.2f}]")
            cells.append(f"{versus['questions_f1_up']} / {versus['questions_f1_down']}")
        rows.append("| " + " | ".join(cells) + " |")
    lines.append("\n".join(rows))
    return "\n\n".join(lines)


def resumed_runs(training: dict[str, Any]) -> list[str]:
    """The training runs whose `train_results.json` covers only part of their schedule.

    A run resumed from a checkpoint reports the samples/s and runtime of the steps after resuming only, so its
    throughput is no measure of the run's training cost: fewer samples than `train_samples` x epochs were timed.
    """
    return [
        name
        for name in ("vanilla", "blockskim")
        if name in training
        and training[name]["train_samples_per_second"] * training[name]["train_runtime"]
        < 0.95 * training[name]["train_samples"] * training[name]["epoch"]
    ]


def training_cost_line(training: dict[str, Any]) -> str:
    """Block-Skim's training throughput against vanilla's, or why this result cannot give it."""
    resumed = resumed_runs(training)
    if resumed:
        return (
            f"Training cost: not comparable in this result: the {' and '.join(resumed)} run was resumed from a "
            "checkpoint, so its samples/s cover only the steps after resuming."
        )
    stage = training.get("predictor_stage")
    later = training.get("later_stages", [])
    later_part = "".join(
        f"; then a stage on top of it {run['train_samples_per_second']:.3f} samples/s, "
        f"{run['train_runtime'] / 60:.0f} minutes for {run['epoch']:.0f} epochs"
        for run in later
    )
    if "stage_on_vanilla_time_ratio" in training:
        vanilla = training["vanilla"]
        return (
            "Training cost: the Block-Skim model is the vanilla model plus a predictor-only stage (backbone and span "
            f"head frozen): vanilla {vanilla['train_samples_per_second']:.3f} samples/s, "
            f"{vanilla['train_runtime'] / 60:.0f} minutes; the stage {stage['train_samples_per_second']:.3f} "
            f"samples/s, {stage['train_runtime'] / 60:.0f} minutes for {stage['epoch']:.0f} epochs{later_part} "
            f"(threads in *Setup*): {training['stage_on_vanilla_time_ratio']:.2f}× the vanilla training time in all."
        )
    line = (
        "Training cost (both runs side by side, one thread each): Block-Skim "
        f"{training['blockskim']['train_samples_per_second']:.3f} vs vanilla "
        f"{training['vanilla']['train_samples_per_second']:.3f} samples/s = "
        f"{training['blockskim_over_vanilla_samples_per_second']:.3f}× the vanilla throughput."
    )
    if stage:
        line += (
            " The predictor-only stage (run after them; its threads in *Setup*): "
            f"{stage['train_samples_per_second']:.3f} samples/s, {stage['train_runtime'] / 60:.0f} minutes"
            f" for {stage['epoch']:.0f} epochs{later_part}."
        )
    return line


def render(grouped: dict[str, list[tuple[str, dict[str, Any]]]], plot_paths: list[str]) -> str:
    """The generated part of one markdown file: a section per results file (grouped by kind as `load_results`
    returns them), then the plots."""
    sections = []
    for stem, result in grouped["squad"]:
        training = result.get("training")
        parts = [
            f"### {_title(result)}",
            f"Source: `benchmarks/results/{stem}.json`. {provenance(result)}",
            accuracy_table(result),
            oracle_line(result),
            "Kept-token fraction per layer (real tokens entering each layer, over all windows):",
            kept_table(result),
            "Wall-clock detail (per window; ideal truncation = stock layers on the same per-layer kept lengths):",
            timing_table(result),
        ]
        if training:
            parts.append(training_cost_line(training))
        sections.append("\n\n".join(parts))
    sections += [paired_bootstrap_section(stem, result) for stem, result in grouped["paired_bootstrap"]]
    sections += [layer_sweep_section(stem, sweep) for stem, sweep in grouped["predictor_layers"]]
    sections += [probe_section(stem, probe) for stem, probe in grouped["predictor_probe"]]
    sections += [overhead_section(stem, profile) for stem, profile in grouped["overhead_profile"]]
    sections += [oracle_latency_section(stem, table) for stem, table in grouped["oracle_latency"]]
    sections += [f"![{Path(path).stem}]({path})" for path in plot_paths]
    return "\n\n".join(sections)


BENCHMARK_KINDS = (
    "squad",
    "paired_bootstrap",
    "predictor_layers",
    "predictor_probe",
    "overhead_profile",
    "oracle_latency",
)
"""The `benchmark` field of the results files `render` knows, in the order it writes their sections."""


def load_results(directory: Path) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Every results file of a known kind, as `(stem, data)` in file-name order, grouped by its `benchmark` field."""
    grouped: dict[str, list[tuple[str, dict[str, Any]]]] = {kind: [] for kind in BENCHMARK_KINDS}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") in grouped:
            grouped[data["benchmark"]].append((path.stem, data))
    return grouped


def _headline_rank(stem: str, headline: tuple[str, ...]) -> int | None:
    """Position of the first headline prefix the stem starts with; `None` for a result of EXPERIMENTS.md."""
    return next((rank for rank, prefix in enumerate(headline) if stem.startswith(prefix)), None)


def _squad_order(item: tuple[str, dict[str, Any]], headline: tuple[str, ...]) -> tuple:
    """Headline results in `headline` order, then SQuAD before SQuAD-long and shorter windows first; the rest with
    the predictor-only and question-feature models first, as the studies built on them."""
    stem, result = item
    setup = result["setup"]
    rank = _headline_rank(stem, headline)
    return (
        len(headline) if rank is None else rank,
        not setup.get("joint_training"),
        not setup.get("predictor_question_features", False),
        result["variant"] != "squad",
        setup["max_seq_length"],
        stem,
    )


def write_generated(markdown: Path, generated: str, title: str) -> None:
    """Replace what lies between the markers of `markdown` (a new file gets a title and the markers), atomically."""
    text = markdown.read_text() if markdown.exists() else f"# {title}\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{markdown} lacks the {BEGIN} / {END} markers that delimit the generated part.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    temporary = markdown.with_suffix(".tmp")
    temporary.write_text(f"{head}{BEGIN}\n{generated}\n{END}{tail}")
    temporary.replace(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help="the headline report")
    parser.add_argument(
        "--experiments",
        type=Path,
        default=ROOT / "benchmarks" / "EXPERIMENTS.md",
        help="the lab notebook: every result that is not a headline one",
    )
    parser.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "plots")
    parser.add_argument(
        "--headline",
        nargs="+",
        default=list(HEADLINE_RESULTS),
        help="name prefixes of the results that go to --markdown, in their order (the rest go to --experiments)",
    )
    args = parser.parse_args()
    headline = tuple(args.headline)

    grouped = load_results(args.results)
    if not grouped["squad"]:
        raise SystemExit(f"no squad results in {args.results}; run benchmarks/squad.py first.")
    grouped["squad"].sort(key=lambda item: _squad_order(item, headline))
    lead, rest = ({kind: [] for kind in grouped} for _ in range(2))
    for kind, items in grouped.items():
        for item in items:
            (rest if _headline_rank(item[0], headline) is None else lead)[kind].append(item)
    plot_paths = plot(lead["squad"] or grouped["squad"], args.plots)
    write_generated(args.markdown, render(lead, plot_paths), "Benchmarks")
    write_generated(args.experiments, render(rest, []), "Experiments")
    print(f"wrote {args.markdown}, {args.experiments} and {', '.join(plot_paths)}")


if __name__ == "__main__":
    main()
