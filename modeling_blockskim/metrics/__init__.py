"""Evaluation metrics that ship inside the package, so that training and evaluation never reach the Hub.

`evaluate.load("squad")` downloads its script from the Hugging Face Hub on first use, which fails on offline
clusters. The SQuAD metric here is the same computation (see `squad_blockskim/squad_blockskim.py`), loaded by
`evaluate` from its local path. Library-only: nothing here travels with checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

SQUAD_METRIC_PATH: Path = Path(__file__).resolve().parent / "squad_blockskim" / "squad_blockskim.py"
"""Absolute path of the self-contained SQuAD metric script; `evaluate.load` accepts it directly."""


def load_squad_metric(version_2_with_negative: bool = False, **load_kwargs) -> evaluate.EvaluationModule:
    """Load the offline SQuAD Exact Match / F1 metric.

    Args:
        version_2_with_negative (`bool`, *optional*, defaults to `False`):
            `False` scores SQuAD v1.1 and MRQA (config "squad": "exact_match" and "f1"). `True` scores SQuAD v2.0,
            where questions may be unanswerable (config "squad_v2": predictions also carry "no_answer_probability",
            and the result has the HasAns/NoAns breakdown and the best no-answer thresholds). The name matches the
            `run_qa.py` data argument that selects SQuAD v2.0.
        load_kwargs:
            Passed on to `evaluate.load`, e.g. `keep_in_memory=True` or `cache_dir`.

    Returns:
        `evaluate.EvaluationModule`: call `.compute(predictions=..., references=...)` on it.

    Example:

    ```python
    >>> from modeling_blockskim.metrics import load_squad_metric

    >>> squad = load_squad_metric()
    >>> squad.compute(
    ...     predictions=[{"id": "q1", "prediction_text": "Denver Broncos"}],
    ...     references=[{"id": "q1", "answers": {"text": ["Denver Broncos"], "answer_start": [177]}}],
    ... )
    {'exact_match': 100.0, 'f1': 100.0}
    ```
    """
    config_name = "squad_v2" if version_2_with_negative else "squad"
    return evaluate.load(str(SQUAD_METRIC_PATH), config_name, **load_kwargs)


__all__ = ["SQUAD_METRIC_PATH", "load_squad_metric"]
