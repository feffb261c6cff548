"""`BlockSkimConfig`: the backbone's own configuration plus the Block-Skim settings.

Travels with every checkpoint as remote code, so it imports only the standard library, torch and transformers.
Implements the hyper-parameters of Guan et al., "Block-Skim: Efficient Question Answering for Transformer"
(AAAI 2022), section 3: block size, predictor layers, skim threshold, balance factor and harmony coefficient.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Literal

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

SUPPORTED_BACKBONES: tuple[str, ...] = ("bert", "roberta", "electra")
"""Backbone `model_type`s whose embeddings add absolute positions once, so dropping tokens later is safe."""

DEFAULT_SEP_TOKEN_IDS: dict[str, int] = {"bert": 102, "electra": 102, "roberta": 2}
"""Separator id of the standard vocabulary of each backbone; `from_backbone` reads the real one from the tokenizer."""

SKIM_LOSS_REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def is_layer_index(key: object) -> bool:
    """A key of a per-layer `skim_threshold`: an int, or the string of one as a mapping comes back from JSON."""
    return not isinstance(key, bool) and (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()))


def layer_thresholds(skim_threshold: float | Mapping[int, float], skim_layers: list[int]) -> dict[int, float]:
    """tau of every predictor layer, from one tau for all of them or a mapping with one per layer.

    One tau for all layers is the paper's rule. A mapping sets one per layer: a later predictor judges states that have
    read more of the question, so it can afford a stricter tau than the first (benchmarks/EXPERIMENTS.md, *Per-layer
    τ*). A mapping must name exactly the predictor layers, so that a typo in a layer index cannot silently skim with a
    default. Keys may be strings of ints, as a mapping comes back from a `config.json`.

    Raises:
        `ValueError`: naming the bad entry, for a tau outside [0, 1], a key that is not a layer index, or a mapping
            whose layers differ from `skim_layers`.
    """
    layers = sorted(skim_layers)
    if not isinstance(skim_threshold, Mapping):
        return dict.fromkeys(layers, _checked_tau("skim_threshold", skim_threshold))
    given: dict[int, object] = {}
    for key, tau in skim_threshold.items():
        if not is_layer_index(key):
            raise ValueError(f"skim_threshold has the key {key!r}, which is not a layer index.")
        given[int(key)] = tau
    if sorted(given) != layers:
        raise ValueError(
            f"skim_threshold sets tau for layers {sorted(given)}, but this model has predictors after layers "
            f"{layers}: give one tau per predictor layer."
        )
    return {layer: _checked_tau(f"skim_threshold[{layer}]", given[layer]) for layer in layers}


def parse_thresholds(text: str) -> float | tuple[float, ...]:
    """The command-line form of `skim_threshold`: `0.3` (one tau for all predictor layers) or `0.2/0.4/0.6` (one per
    predictor layer, lowest layer first), which needs no quoting in a shell, unlike a mapping.

    Raises:
        `ValueError`: naming the text, when a part is not a float.
    """
    try:
        values = tuple(float(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not a float or floats joined by '/' (one tau per predictor layer)") from None
    return values[0] if len(values) == 1 else values


def thresholds_for_layers(tau: float | Sequence[float], skim_layers: list[int]) -> float | dict[int, float]:
    """`skim_threshold` for a model with predictors after `skim_layers`, from `parse_thresholds`' result: one float
    stays one float, a sequence becomes the mapping `{layer: tau}`, lowest layer first.

    Raises:
        `ValueError`: when the sequence does not give exactly one tau per predictor layer.
    """
    if isinstance(tau, numbers.Real):
        return float(tau)
    layers = sorted(skim_layers)
    if len(tau) != len(layers):
        taus = "/".join(f"{value:g}" for value in tau)
        raise ValueError(f"{taus} gives {len(tau)} taus for layers {layers}: give one per predictor layer.")
    return dict(zip(layers, (float(value) for value in tau), strict=True))


def trained_predictor_subset(
    skim_layers: Sequence[int] | None, trained: Sequence[int], source: str, advice: str = ""
) -> list[int]:
    """The predictor layers to keep when a checkpoint with predictors after `trained` is loaded with `skim_layers`
    (`None`: all of them), sorted.

    `from_pretrained(path, skim_layers=...)` gives a layer the checkpoint has no predictor for a new, randomly
    initialised one (reported as missing): what a new predictor-only stage may want, never what inference or a stage
    that keeps the trained predictors wants. Those callers ask here first.

    Raises:
        `ValueError`: `"{source} has trained predictors only for layers [...], not [...]{advice}."`, when a layer of
            `skim_layers` has no trained predictor.
    """
    layers = list(trained) if skim_layers is None else sorted(set(skim_layers))
    untrained = sorted(set(layers) - set(trained))
    if untrained:
        raise ValueError(f"{source} has trained predictors only for layers {list(trained)}, not {untrained}{advice}.")
    return layers


def _checked_tau(name: str, tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise ValueError(f"{name} must be a float in [0.0, 1.0] or a mapping from layer to tau, got {tau!r}.")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"{name}={tau!r} is out of range: allowed [0.0, 1.0].")
    return float(tau)


def threshold_label(skim_threshold: float | Mapping[int, float]) -> str:
    """`0.3`, or `0.2 / 0.4 / 0.6 after layers 1 / 2 / 3` for one tau per layer: for cards, plots and messages."""
    if not isinstance(skim_threshold, Mapping):
        return f"{skim_threshold:g}"
    layers = sorted(skim_threshold, key=int)
    taus = " / ".join(f"{skim_threshold[layer]:g}" for layer in layers)
    return f"{taus} after layers {' / '.join(str(layer) for layer in layers)}"


class BlockSkimConfig(PretrainedConfig):
    r"""Configuration of a [`BlockSkimForQuestionAnswering`] model.

    The backbone (BERT, RoBERTa or ELECTRA) keeps its own configuration in `backbone_config`; the fields below only
    describe what Block-Skim adds. Every invalid value raises a `ValueError` at construction that names the field and
    the allowed range.

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            Configuration of the backbone encoder. A `dict` must carry `model_type`. Defaults to `BertConfig()`.
        block_size (`int`, *optional*, defaults to 32):
            Tokens per block. The skim predictor pools the bs x bs attention image twice by 2, so the block size must
            be a positive multiple of 4 (the paper finds 8 to 64 equally good, 128 worse). A kept block keeps all its
            tokens, so smaller blocks skim finer: with the block-question predictors on MiniLM/SQuAD, 16 saves more
            FLOPs at the same F1 than 32 or 8 (benchmarks/EXPERIMENTS.md, model (e)).
        skim_layers (`list[int]`, *optional*):
            0-based indices of the layers followed by a skim predictor. Defaults to every layer but the last (a
            decision after the last layer would save nothing, so the last layer is not allowed). An empty list gives
            the plain backbone QA model.
        skim_threshold (`float` or `dict[int, float]`, *optional*, defaults to 0.01):
            tau: at inference a passage block is kept when the predictor's P(keep) >= tau. In [0, 1]; 0 keeps
            everything, 1 skims every block that is not protected ([CLS], question, separators). A mapping from
            predictor layer to tau sets one per layer (it must name exactly `skim_layers`; see `layer_thresholds`).
        balance_factor (`float`, *optional*, defaults to 20.0):
            beta: class weight of the positive ("holds the answer") blocks in the skim loss; the paper uses 20 for
            SQuAD and HotpotQA, 30 for NewsQA and NaturalQuestions, 100 for TriviaQA and 150 for SearchQA. >= 0.
        harmony_coefficient (`float`, *optional*, defaults to 0.1):
            alpha: weight of the skim loss next to the QA loss (0.1 for BERT-style backbones, 0.01 for ALBERT). >= 0.
        skim_loss_reduction (`"sum"` or `"mean"`, *optional*, defaults to `"sum"`):
            How the per-layer skim losses combine: `"sum"` as in the paper (alpha then scales with the number of
            predictor layers) or `"mean"` (alpha is independent of the depth).
        skim_at_inference (`bool`, *optional*, defaults to `True`):
            Whether an evaluation-mode forward skims. Each call can override it with `skim=...`; joint training
            never skims.
        predictor_question_features (`bool`, *optional*, defaults to `False`):
            Also give each predictor, next to the block's own attention square (the paper's only input), how much
            attention flows between the block and the question: per head, the mean mass the block's tokens put on
            the question tokens and the mass the question tokens put on the block (2 x heads numbers per block,
            O(length x question) to compute). Not in the paper: the diagonal square never sees the question, and on
            small backbones it barely predicts where the answer is (see benchmarks/EXPERIMENTS.md).
        predictor_diagonal_block (`bool`, *optional*, defaults to `True`):
            Whether the predictors read the block's own attention square with the paper's CNN. `False` (which needs
            `predictor_question_features=True`) makes each predictor a linear classifier of the normalised
            block-question masses alone: neither the squares nor the CNN are computed, which is most of a
            predictor layer's cost on small inputs. On MiniLM/SQuAD the CNN adds nothing to those masses (see
            benchmarks/EXPERIMENTS.md).
        predictor_block_context (`bool`, *optional*, defaults to `False`):
            Give the predictors the block-question masses in context rather than raw (needs
            `predictor_question_features=True`): as log-ratios to uniform attention, so that they do not shrink as
            windows grow, together with those of the neighbouring blocks and the difference to the window's best
            block, since whether a block is the one the question asks about depends on the others (8 x heads numbers
            per block instead of 2 x heads, and about a dozen more small kernels per predictor call, which count at
            batch 1 on CPU: benchmarks/EXPERIMENTS.md, *Where the batch-1 time goes*). Not in the paper.
        predictor_token_matching (`bool`, *optional*, defaults to `False`):
            Also let the predictors compare the block's tokens with the question's, on the hidden states the
            predictor layer outputs (needs `predictor_question_features=True`, which tracks the question): per
            matching head, each question token's best learned low-rank similarity to a token of the block, pooled
            over the question with learned weights, and the weighted share of question tokens whose id occurs in
            the block; in context of the neighbouring and best blocks (`predictor_blockskim.TokenMatcher`). An
            attention mass says how much a block and the question attend to each other overall, not whether the
            block holds what the question names; after MiniLM's layer 1 the matching rejects more answer-free
            blocks at the same answer-block recall (benchmarks/EXPERIMENTS.md, *Predictor probes*). Costs two small
            projections of the layer's hidden states and one question-by-sequence product per predictor layer.
            Not in the paper.
        predictor_hidden_size (`int`, *optional*):
            Give each predictor one hidden layer of this many GELU units between its features and its two logits,
            instead of the paper's single linear layer, so that it can weigh features against each other (a strong
            match matters more next to a weak neighbour, say). Costs two small matrix products per predictor call
            (`features x hidden + hidden x 2` multiply-adds per block). `None` (default) keeps the linear layer. Not
            in the paper.
        sep_token_id (`int`, *optional*):
            Id of the separator token. Everything up to the first run of separators (the [CLS] token and the
            question) and every separator are protected from skimming. Defaults to the separator of the backbone's
            standard vocabulary (102 for BERT/ELECTRA, 2 for RoBERTa).

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from modeling_blockskim import BlockSkimConfig

    >>> config = BlockSkimConfig(backbone_config=BertConfig(num_hidden_layers=6), block_size=32)
    >>> config.skim_layers
    [0, 1, 2, 3, 4]
    ```
    """

    model_type = "blockskim"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}
    keys_to_ignore_at_inference = [
        "qa_loss",
        "skim_loss",
        "block_logits",
        "block_labels",
        "block_keep_mask",
        "kept_token_counts",
    ]

    backbone_config: dict | PretrainedConfig | None = None
    block_size: int = 32
    skim_layers: list[int] | None = None
    skim_threshold: float | dict[int, float] = 0.01
    balance_factor: float = 20.0
    harmony_coefficient: float = 0.1
    skim_loss_reduction: Literal["sum", "mean"] = "sum"
    skim_at_inference: bool = True
    predictor_question_features: bool = False
    predictor_diagonal_block: bool = True
    predictor_block_context: bool = False
    predictor_token_matching: bool = False
    predictor_hidden_size: int | None = None
    sep_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        backbone_type = self.backbone_config.model_type
        if backbone_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"backbone_config.model_type={backbone_type!r} is not supported; Block-Skim supports "
                f"{list(SUPPORTED_BACKBONES)} (backbones with absolute position embeddings)."
            )
        num_layers = self.backbone_config.num_hidden_layers
        if self.skim_layers is None:
            self.skim_layers = list(range(num_layers - 1))
        if self.sep_token_id is None:
            self.sep_token_id = DEFAULT_SEP_TOKEN_IDS[backbone_type]
        self._validate_skim_settings(num_layers)

    def _validate_skim_settings(self, num_layers: int) -> None:
        """Fail early, naming the field and its allowed range, instead of deep inside a forward pass."""
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an int, got {self.block_size!r}.")
        max_length = self.backbone_config.max_position_embeddings
        if self.block_size < 4 or self.block_size % 4 != 0 or self.block_size > max_length:
            raise ValueError(
                f"block_size={self.block_size} is not usable: the skim predictor pools the block x block attention "
                f"image twice by 2, so block_size must be a multiple of 4 in [4, {max_length}] "
                "(max_position_embeddings)."
            )
        if not isinstance(self.skim_layers, (list, tuple)) or not all(
            isinstance(layer, int) and not isinstance(layer, bool) for layer in self.skim_layers
        ):
            raise ValueError(f"skim_layers must be a list of ints, got {self.skim_layers!r}.")
        out_of_range = [layer for layer in self.skim_layers if not 0 <= layer <= num_layers - 2]
        if out_of_range:
            raise ValueError(
                f"skim_layers={list(self.skim_layers)} has indices {out_of_range} out of range: a backbone with "
                f"{num_layers} layers accepts predictor layers 0..{num_layers - 2} (a skim decision after the last "
                "layer would save nothing)."
            )
        if len(set(self.skim_layers)) != len(self.skim_layers):
            raise ValueError(f"skim_layers={list(self.skim_layers)} lists a layer more than once.")
        self.skim_layers = sorted(self.skim_layers)
        thresholds = layer_thresholds(self.skim_threshold, self.skim_layers)
        if isinstance(self.skim_threshold, Mapping):
            self.skim_threshold = thresholds  # int keys again after a round trip through JSON
        for name, value, low, high in (
            ("balance_factor", self.balance_factor, 0.0, float("inf")),
            ("harmony_coefficient", self.harmony_coefficient, 0.0, float("inf")),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                allowed = f"[{low}, {high}]" if high != float("inf") else f">= {low}"
                raise ValueError(f"{name}={value!r} is out of range: allowed {allowed}.")
        if self.skim_loss_reduction not in SKIM_LOSS_REDUCTIONS:
            raise ValueError(
                f"skim_loss_reduction={self.skim_loss_reduction!r} is not one of {list(SKIM_LOSS_REDUCTIONS)}."
            )
        for name in (
            "skim_at_inference",
            "predictor_question_features",
            "predictor_diagonal_block",
            "predictor_block_context",
            "predictor_token_matching",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if not (self.predictor_diagonal_block or self.predictor_question_features):
            raise ValueError(
                "predictor_diagonal_block=False needs predictor_question_features=True: a predictor must read "
                "something."
            )
        if self.predictor_block_context and not self.predictor_question_features:
            raise ValueError(
                "predictor_block_context=True needs predictor_question_features=True: the context is that of the "
                "block-question masses."
            )
        if self.predictor_token_matching and not self.predictor_question_features:
            raise ValueError(
                "predictor_token_matching=True needs predictor_question_features=True: the matcher compares the "
                "block with the question tokens those features track."
            )
        hidden = self.predictor_hidden_size
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(
                f"predictor_hidden_size={hidden!r} is out of range: allowed a positive int, or None for the linear "
                "classifier."
            )
        vocab_size = self.backbone_config.vocab_size
        if not isinstance(self.sep_token_id, int) or not 0 <= self.sep_token_id < vocab_size:
            raise ValueError(f"sep_token_id={self.sep_token_id!r} is out of range: allowed [0, {vocab_size - 1}].")

    @property
    def initializer_range(self) -> float:
        """The backbone's weight-initialisation scale, also used for the predictors and the span head."""
        return self.backbone_config.initializer_range

    @property
    def num_hidden_layers(self) -> int:
        return self.backbone_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size


__all__ = ["BlockSkimConfig", "layer_thresholds", "threshold_label"]
