"""How sure a comparison is, with scipy's statistics: every entry is scored on the same test examples, so the
uncertainty of a metric and of the difference between two entries comes from resampling those examples — the same
resamples for every entry (paired).

- `interval`: paired bootstrap 95% interval of a metric, averaged over an entry's seeds (`scipy.stats.bootstrap`,
  percentile method, 1,000 resamples, fixed random state).
- `mcnemar`: McNemar's exact test of two classifiers' errors (`scipy.stats.binomtest` on the discordant pairs);
  it decides ties when the ranked metric is accuracy.
- `permutation_p`: paired randomization test of a difference in any metric, macro F1 and corpus-level ones such
  as chrF included (`scipy.stats.permutation_test`, swapping the two entries' outputs example by example).
- `difference_interval`: paired bootstrap interval of the difference between two entries.

Two entries are *tied* when the test does not reject equality at the 5% level.
"""
from __future__ import annotations

RESAMPLES = 1000
ALPHA = 0.05
SEED = 0
CLASSIFICATION = ("accuracy", "f1_macro", "precision_macro", "recall_macro")
GENERATION = ("chrf", "bleu", "rouge_l", "exact_match")


def metric_fn(key: str, labels: list[str] | None = None):
    """`f(references, predictions) -> float` for metric `key` on a subset of examples (numpy arrays of texts)."""
    if key == "accuracy":
        return lambda y, p: float((y == p).mean())
    if key in CLASSIFICATION:
        return _macro({"precision_macro": 0, "recall_macro": 1, "f1_macro": 2}[key], labels)
    if key in ("chrf", "bleu"):
        # a corpus score is computed from per-sentence n-gram statistics summed over the corpus (sacrebleu's own
        # paired bootstrap works this way): each example's statistics are extracted once, a resample sums them
        from sacrebleu.metrics import BLEU, CHRF

        scorer = CHRF() if key == "chrf" else BLEU()
        cache: dict = {}

        def corpus(y, p):
            import numpy as np

            rows = []
            for ref, hyp in zip(y, p):
                if (ref, hyp) not in cache:
                    cache[ref, hyp] = scorer._extract_corpus_statistics([hyp], [[ref]])[0]
                rows.append(cache[ref, hyp])
            return float(scorer._compute_score_from_stats(np.sum(rows, axis=0).tolist()).score)
        return corpus
    if key == "exact_match":
        return lambda y, p: float(sum(a.strip() == b.strip() for a, b in zip(y, p)) / max(len(y), 1))
    if key == "rouge_l":
        from rouge_score import rouge_scorer

        rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores: dict = {}

        def mean_rouge(y, p):
            for pair in zip(y, p):
                if pair not in scores:
                    scores[pair] = rouge.score(*pair)["rougeL"].fmeasure
            return float(sum(scores[pair] for pair in zip(y, p)) / max(len(y), 1))
        return mean_rouge
    raise ValueError(f"no per-example statistic for metric {key!r}")


def _macro(which: int, labels: list[str] | None):
    """Macro precision (0), recall (1) or F1 (2) as scikit-learn's `precision_recall_fscore_support(y, p,
    labels=labels, zero_division=0)[which].mean()` computes it — the same per-label counts, in numpy. The
    resampling tests call it thousands of times on subsets, and scikit-learn's input validation made one call
    ~5 ms: three minutes of a small `tunelab compare`. tests/unit/test_compare.py checks it against scikit-learn."""
    import numpy as np

    fixed = {name: i for i, name in enumerate(labels)} if labels is not None else None

    def macro(y, p):
        codes = fixed if fixed is not None else {name: i for i, name in enumerate(sorted(set(y) | set(p)))}
        if not codes:
            return 0.0
        yc = np.fromiter((codes.get(v, -1) for v in y), dtype=np.int64, count=len(y))
        pc = np.fromiter((codes.get(v, -1) for v in p), dtype=np.int64, count=len(p))
        k = len(codes)
        true = np.bincount(yc[yc >= 0], minlength=k)
        pred = np.bincount(pc[pc >= 0], minlength=k)
        tp = np.bincount(yc[(yc == pc) & (yc >= 0)], minlength=k)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = (np.where(pred > 0, tp / pred, 0.0), np.where(true > 0, tp / true, 0.0),
                     np.where(true + pred > 0, 2 * tp / (true + pred), 0.0))[which]
        return float(score.mean())
    return macro


def _bootstrap(statistic, n: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of `statistic(indices)` over resamples of n test examples (the same
    resamples for every call: fixed random state)."""
    import numpy as np
    from scipy.stats import bootstrap

    res = bootstrap((np.arange(n),), lambda idx: statistic(idx.astype(int)), vectorized=False,
                    n_resamples=RESAMPLES, method="percentile", confidence_level=1 - ALPHA, random_state=SEED)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def interval(metric, references, predictions_by_seed: list) -> tuple[float, float]:
    """95% paired bootstrap interval of the seed-averaged metric (resampling test examples)."""
    import numpy as np

    y = np.asarray(references, dtype=object)
    preds = [np.asarray(p, dtype=object) for p in predictions_by_seed]

    def statistic(idx):
        return float(np.mean([metric(y[idx], p[idx]) for p in preds]))

    if len(y) < 2:
        value = statistic(np.arange(len(y)))
        return value, value
    return _bootstrap(statistic, len(y))


def difference_interval(metric, references, a, b) -> tuple[float, float]:
    """95% paired bootstrap interval of metric(a) − metric(b) on the same resamples of the test examples."""
    import numpy as np

    y, a, b = (np.asarray(x, dtype=object) for x in (references, a, b))
    return _bootstrap(lambda idx: metric(y[idx], a[idx]) - metric(y[idx], b[idx]), len(y))


def mcnemar(references, a, b) -> dict:
    """McNemar's exact test: of the examples exactly one of the two classifiers gets right, is the split 50/50?"""
    from scipy.stats import binomtest

    a_only = sum(r == x and r != z for r, x, z in zip(references, a, b))
    b_only = sum(r == z and r != x for r, x, z in zip(references, a, b))
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5).pvalue)
    return {"test": "McNemar (exact)", "only_a_right": int(a_only), "only_b_right": int(b_only), "p": p}


def permutation_p(metric, references, a, b) -> dict:
    """Paired randomization test of metric(a) − metric(b): each example's two outputs are swapped at random."""
    import numpy as np
    from scipy.stats import permutation_test

    y, a, b = (np.asarray(x, dtype=object) for x in (references, a, b))

    def statistic(x, z):
        return metric(y, x) - metric(y, z)

    res = permutation_test((a, b), statistic, permutation_type="samples", vectorized=False, n_resamples=RESAMPLES,
                           alternative="two-sided", random_state=SEED)
    return {"test": "paired permutation", "p": float(res.pvalue)}


def p_text(p: float) -> str:
    """A p-value as the report prints it: at the resolution of the resampling tests, "p ≤ 0.002"."""
    floor = 2 / (RESAMPLES + 1)
    return f"p ≤ {floor:.1g}" if p <= floor * 1.0001 else f"p = {p:.2g}"


def compare_to_best(key: str, references, best: list, other: list, labels=None) -> dict:
    """The test of one entry against the best on the ranked metric (first seed's outputs of each): McNemar for
    accuracy, a paired permutation test of the metric itself otherwise (macro F1, chrF...) — with McNemar's p beside
    it for classifiers. `tied` when p ≥ 0.05."""
    if key == "accuracy":
        result = mcnemar(references, best, other)
    else:
        result = permutation_p(metric_fn(key, labels), references, best, other)
        if key in CLASSIFICATION:
            result["mcnemar_p"] = mcnemar(references, best, other)["p"]
    return {**result, "tied": result["p"] >= ALPHA}
