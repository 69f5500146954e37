"""Pure-Python evaluation metrics: voice markers, lexicon, key facts, composite fidelity, stability.

Every score is in [0, 1]; the formulas are documented in docs/evaluation.md. No torch here."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from statistics import median

from mindprint_ray.errors import UserError

DEFAULT_WEIGHTS = {"markers": 0.3, "lexicon": 0.2, "semantic": 0.3, "preference": 0.2}
COMPONENTS = tuple(DEFAULT_WEIGHTS)
_DASHES = re.compile(r"[\u2010\u2011\u2012\u2013\u2014\u2212-]")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_SPACES = re.compile(r"\s+")
OPEN_COMPONENTS = ("markers", "lexicon", "semantic", "key_fact_recall")  # per open answer
ITEM_KINDS = ("open", "mc", "pairs")  # the groups of per-item values, resampled independently
SCORES = (*OPEN_COMPONENTS, "mc_accuracy", "preference", "voice_fidelity", "accuracy")
RESAMPLES = 1000
LEVEL = 0.95


# ---- text matching --------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, straight quotes, hyphens and dashes as spaces, single spaces."""
    text = _DASHES.sub(" ", text.translate(_QUOTES).lower())
    return _SPACES.sub(" ", text).strip()


def _pattern(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])" + re.escape(normalize(phrase)) + r"(?:e?s)?(?![a-z0-9])")


def phrase_counts(text: str, phrases: Iterable[str]) -> dict[str, int]:
    """Whole-word occurrences of each phrase; longer phrases are matched first and consume their text."""
    remaining = normalize(text)
    counts: dict[str, int] = {}
    for phrase in sorted(set(phrases), key=lambda p: (-len(normalize(p)), p)):
        remaining, n = _pattern(phrase).subn(" | ", remaining)
        counts[phrase] = n
    return counts


def contains(text: str, phrase: str) -> bool:
    """Whether `phrase` (or its plural) occurs in `text` as whole words (case, hyphen, quote insensitive)."""
    return _pattern(phrase).search(normalize(text)) is not None


# ---- voice markers --------------------------------------------------------------------------------


def marker_profile(text: str, groups: Mapping[str, list[str]]) -> dict[str, float]:
    """Per group (hedges, confidence, teaching): marker occurrences per 100 words."""
    words = max(len(normalize(text).split()), 1)
    return {g: 100.0 * sum(phrase_counts(text, phrases).values()) / words for g, phrases in groups.items()}


def cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Cosine of two non-negative profiles in [0, 1]; 1 when both are all-zero, 0 when only one is."""
    keys = sorted(set(a) | set(b))
    dot = sum(a.get(k, 0.0) * b.get(k, 0.0) for k in keys)
    na = math.sqrt(sum(a.get(k, 0.0) ** 2 for k in keys))
    nb = math.sqrt(sum(b.get(k, 0.0) ** 2 for k in keys))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return min(1.0, max(0.0, dot / (na * nb)))


def marker_similarity(generated: str, reference: str, groups: Mapping[str, list[str]]) -> float:
    """Cosine similarity of the per-group marker-frequency profiles of answer and reference."""
    return cosine(marker_profile(generated, groups), marker_profile(reference, groups))


# ---- lexicon and facts ----------------------------------------------------------------------------


def lexicon_terms(text: str, lexicon: Iterable[str]) -> set[str]:
    """The lexicon terms used at least once in `text`."""
    return {t for t, n in phrase_counts(text, lexicon).items() if n > 0}


def lexicon_usage(generated: str, lexicon: Iterable[str], reference: str | None = None) -> float:
    """Share of the reference's lexicon terms the answer uses; without any, 1 if it uses a term at all."""
    lexicon = list(lexicon)
    used = lexicon_terms(generated, lexicon)
    wanted = lexicon_terms(reference, lexicon) if reference else set()
    if not wanted:
        return 1.0 if used else 0.0
    return len(used & wanted) / len(wanted)


def key_fact_recall(generated: str, facts: list[str]) -> float | None:
    """Share of key facts stated in the answer (whole-word, normalised match); None without facts."""
    if not facts:
        return None
    return sum(contains(generated, f) for f in facts) / len(facts)


# ---- aggregation ----------------------------------------------------------------------------------


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """The composite weights, validated: known components, non-negative, not all zero."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = sorted(set(weights) - set(COMPONENTS))
    if unknown:
        raise UserError(
            f"unknown voice-fidelity component(s) {unknown}",
            field="eval.weights",
            hint=f"use only {', '.join(COMPONENTS)}",
        )
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise UserError(
            "voice-fidelity weights must be non-negative and not all zero",
            field="eval.weights",
            hint="e.g. {markers: 0.3, lexicon: 0.2, semantic: 0.3, preference: 0.2}",
        )
    return weights


def voice_fidelity(components: Mapping[str, float | None], weights: Mapping[str, float] | None = None) -> float | None:
    """Weighted mean of the available components, weights renormalised over those present."""
    weights = check_weights(weights)
    present = {k: v for k, v in components.items() if k in weights and v is not None and weights[k] > 0}
    total = sum(weights[k] for k in present)
    if total == 0:
        return None
    return sum(weights[k] * v for k, v in present.items()) / total


def accuracy(mc_accuracy: float | None, recall: float | None) -> float | None:
    """Mean of multiple-choice accuracy and key-fact recall, over those that exist."""
    return mean([mc_accuracy, recall])


def composite(groups: Mapping[str, Sequence], weights: Mapping[str, float] | None = None) -> dict:
    """Every score from per-item values: `open` (dicts of OPEN_COMPONENTS per answer), `mc` (1.0 correct /
    0.0 per item), `pairs` (1.0 win / 0.0 per held-out pair). The point estimate and each bootstrap resample
    both go through here, so the formulas exist once."""
    rows = groups.get("open", ())
    scores: dict = {k: mean(r.get(k) for r in rows) for k in OPEN_COMPONENTS}
    scores["mc_accuracy"] = mean(groups.get("mc", ()))
    scores["preference"] = mean(groups.get("pairs", ()))
    scores["voice_fidelity"] = voice_fidelity(scores, weights)
    scores["accuracy"] = accuracy(scores["mc_accuracy"], scores["key_fact_recall"])
    return scores


def item_lists(items: Mapping[str, Mapping]) -> dict[str, list]:
    """The per-item values stored by id (`scores["items"]`) as the lists `composite` takes."""
    return {k: list(items.get(k, {}).values()) for k in ITEM_KINDS}


# ---- bootstrap intervals ------------------------------------------------------------------------------


def bootstrap(
    groups: Mapping[str, Sequence],
    statistic: Callable[[dict[str, list]], Mapping[str, float | None]],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap: resample each group's items with replacement (independently, same sizes),
    recompute `statistic` (a dict of named values), and return each name's [lo, hi] central `level`
    interval; None for a name that was never computable. Seeded: the same inputs give the same interval."""
    rng, draws = random.Random(seed), {}
    for _ in range(resamples):
        sample = {g: rng.choices(items, k=len(items)) if items else [] for g, items in groups.items()}
        for name, value in statistic(sample).items():
            draws.setdefault(name, [])
            if value is not None:
                draws[name].append(value)
    tail = 100 * (1 - level) / 2
    return {
        name: [interpolated_percentile(v, tail), interpolated_percentile(v, 100 - tail)] if v else None
        for name, v in draws.items()
    }


def mean_interval(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> list[float] | None:
    """Bootstrap interval of a plain mean (None without values)."""
    return bootstrap({"x": list(values)}, lambda g: {"x": mean(g["x"])}, resamples, seed, level)["x"]


def score_intervals(
    items: Mapping[str, Mapping],
    weights: Mapping[str, float] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, list[float] | None]:
    """`<score>_ci` for every score of `composite`: open items, MC items and pairs resampled independently,
    the composites recomputed with the same weights as the point estimate."""
    weights = check_weights(weights)
    cis = bootstrap(item_lists(items), lambda g: composite(g, weights), resamples, seed, level)
    return {f"{k}_ci": cis.get(k) for k in SCORES}


def excludes(interval: Sequence[float] | None, value: float | None) -> bool:
    """Whether `value` lies outside the interval (False when either is missing)."""
    return interval is not None and value is not None and not interval[0] <= value <= interval[1]


def paired_difference(
    before: Mapping[str, Mapping],
    after: Mapping[str, Mapping],
    metric: str,
    weights: Mapping[str, float] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """after - before of one score on the items both stages scored (matched by id), with a paired bootstrap
    interval: each resample draws item ids once and scores both stages on them. `differs`: the interval
    excludes 0."""
    weights = check_weights(weights)
    ids = {k: sorted(set(before.get(k, {})) & set(after.get(k, {}))) for k in ITEM_KINDS}

    def diff(sample: dict[str, list]) -> dict[str, float | None]:
        a = composite({k: [after[k][i] for i in sample[k]] for k in ITEM_KINDS}, weights)[metric]
        b = composite({k: [before[k][i] for i in sample[k]] for k in ITEM_KINDS}, weights)[metric]
        return {"diff": None if a is None or b is None else a - b}

    point, ci = diff(ids)["diff"], bootstrap(ids, diff, resamples, seed, level)["diff"]
    return {
        "metric": metric,
        "diff": point,
        "diff_ci": ci,
        "differs": excludes(ci, 0.0),
        "n": {k: len(v) for k, v in ids.items()},
    }


def compare_stages(
    before: Mapping,
    after: Mapping,
    metric: str = "voice_fidelity",
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
) -> dict:
    """Whether a stage's score differs from an earlier stage's (two per-topic score dicts from the runner):
    `above` (after > before), `excludes_before` (after's 95% interval leaves out before's point estimate,
    the issue's acceptance test) and the paired difference on shared items (`diff`, `diff_ci`, `differs`)."""
    b, a = before.get(metric), after.get(metric)
    out = {
        "before": b,
        "after": a,
        "after_ci": after.get(f"{metric}_ci"),
        "above": a is not None and b is not None and a > b,
        "excludes_before": excludes(after.get(f"{metric}_ci"), b),
    }
    if "items" in before and "items" in after:
        out.update(
            {
                k: v
                for k, v in paired_difference(before["items"], after["items"], metric, weights, seed=seed).items()
                if k != "metric"
            }
        )
    return out


def perplexity(scored: Iterable[tuple[float, int]]) -> float | None:
    """exp(-(sum of log-probs) / (number of tokens)) over (sum log-prob, token count) items; None if empty."""
    scored = list(scored)
    tokens = sum(n for _, n in scored)
    return math.exp(-sum(s for s, _ in scored) / tokens) if tokens else None


def perplexity_interval(
    scored: Sequence[tuple[float, int]], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> list[float] | None:
    """Bootstrap interval of `perplexity` over the items (answers) of the general text."""
    return bootstrap({"x": list(scored)}, lambda g: {"x": perplexity(g["x"])}, resamples, seed, level)["x"]


# ---- stability ------------------------------------------------------------------------------------


def interpolated_percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linearly interpolated between the order statistics around rank
    (n - 1) x q / 100 (numpy's default, Hyndman-Fan type 7): the median of [1, 2] is 1.5. None without values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bad(x) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity")
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isfinite(x)


def loss_spikes(losses: list[float], factor: float = 2.0, window: int = 5, min_jump: float = 0.1) -> int:
    """Steps whose loss exceeds `factor` x and `min_jump` + the median of the previous `window` losses."""
    spikes = 0
    for i, loss in enumerate(losses):
        history = losses[max(0, i - window) : i]
        if len(history) >= min(window, 3):
            base = median(history)
            spikes += loss > factor * base and loss > base + min_jump
    return spikes


def stability(records: Iterable[dict], spike_factor: float = 2.0, window: int = 5) -> dict:
    """NaN/inf count, loss-spike count (per topic and stage) and grad-norm percentiles of metrics records."""
    series: dict[tuple, list[float]] = {}
    grads: list[float] = []
    bad = steps = 0
    for r in records:
        if "loss" not in r and "grad_norm" not in r:
            continue
        steps += 1
        bad += sum(_bad(r.get(k)) for k in ("loss", "grad_norm"))
        if _finite(r.get("loss")):
            series.setdefault((r.get("topic"), r.get("stage")), []).append(float(r["loss"]))
        if _finite(r.get("grad_norm")):
            grads.append(float(r["grad_norm"]))
    spikes = sum(loss_spikes(s, spike_factor, window) for s in series.values())
    return {
        "steps": steps,
        "nan_inf": bad,
        "loss_spikes": spikes,
        "stable": bad == 0 and spikes == 0,
        "grad_norm_p50": interpolated_percentile(grads, 50),
        "grad_norm_p90": interpolated_percentile(grads, 90),
        "grad_norm_p99": interpolated_percentile(grads, 99),
        "grad_norm_max": max(grads) if grads else None,
    }
