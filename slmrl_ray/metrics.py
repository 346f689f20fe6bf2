"""Evaluation metrics exactly as the study defines them (pure functions).

No model code lives here: callers compute per-text NLLs, reward-model scores
and generations, and these functions turn them into the reported numbers.

Naming note: the study reported sacrebleu's 4-gram precision under the name
"BLEU-4". ``bleu_scores`` returns both the real corpus BLEU (``bleu``) and
that 4-gram precision (``precision_4gram``), each under its correct name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

__all__ = [
    "analytical_win_rate",
    "bleu_scores",
    "distinct_n",
    "paired_win_rate",
    "reward_summary",
    "rouge_f1_per_example",
    "rouge_scores",
    "token_weighted_perplexity",
]


def token_weighted_perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Corpus perplexity exp(sum of NLL / sum of tokens).

    Token-weighted on purpose: this is NOT the mean of per-text perplexities,
    which over-weights short texts and is dominated by outliers.

    Args:
        nll_sums: summed negative log-likelihood (nats) of each text.
        token_counts: number of scored tokens of each text.
    """
    if len(nll_sums) != len(token_counts):
        raise ValueError(f"length mismatch: {len(nll_sums)} nll sums vs {len(token_counts)} counts")
    total_tokens = sum(token_counts)
    if total_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(math.fsum(nll_sums) / total_tokens)


def reward_summary(rewards: Sequence[float]) -> dict[str, float]:
    """Mean, population std (ddof=0), min, max and count of reward scores."""
    if len(rewards) == 0:
        raise ValueError("reward_summary needs at least one reward")
    values = np.asarray(rewards, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=0)),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


def analytical_win_rate(mean_sft: float, std_sft: float, mean_ppo: float, std_ppo: float) -> float:
    """P(PPO reward > SFT reward) if both are independent normals.

    Phi(delta / sqrt(std_sft^2 + std_ppo^2)) with delta = mean_ppo - mean_sft.
    With both stds 0 the comparison is deterministic: 1.0, 0.5 or 0.0 by the
    sign of delta.
    """
    delta = mean_ppo - mean_sft
    scale = math.sqrt(std_sft**2 + std_ppo**2)
    if scale == 0.0:
        return 1.0 if delta > 0 else 0.5 if delta == 0 else 0.0
    return 0.5 * (1.0 + math.erf(delta / scale / math.sqrt(2.0)))


def paired_win_rate(
    ppo_rewards: Sequence[float],
    sft_rewards: Sequence[float],
    num_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Per-prompt paired win rate of PPO over SFT with a bootstrap CI.

    Element i of both sequences must score responses to the same prompt.
    A win counts 1, a tie 0.5, a loss 0. The CI is the percentile bootstrap
    over prompts (resampling with replacement) from a generator seeded with
    ``seed``, so the same inputs and seed give the same interval.

    Returns:
        dict(win_rate, ci_low, ci_high).
    """
    if len(ppo_rewards) != len(sft_rewards):
        raise ValueError(f"length mismatch: {len(ppo_rewards)} vs {len(sft_rewards)}")
    if len(ppo_rewards) == 0:
        raise ValueError("paired_win_rate needs at least one prompt")
    if num_bootstrap < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("need num_bootstrap >= 1 and 0 < confidence < 1")
    ppo = np.asarray(ppo_rewards, dtype=np.float64)
    sft = np.asarray(sft_rewards, dtype=np.float64)
    outcomes = (ppo > sft).astype(np.float64) + 0.5 * (ppo == sft)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, outcomes.size, size=(num_bootstrap, outcomes.size))
    boot = outcomes[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(boot, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return {"win_rate": float(outcomes.mean()), "ci_low": float(low), "ci_high": float(high)}


def distinct_n(responses: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams.

    Tokens are lower-cased whitespace tokens; n-grams never cross from one
    response into the next. Returns 0.0 when there are no n-grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for response in responses:
        tokens = response.lower().split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_f1_per_example(
    predictions: Sequence[str], references: Sequence[str], keys: Sequence[str] = ROUGE_KEYS
) -> dict[str, list[float]]:
    """Per-prompt ROUGE F1 (rouge_score, Porter stemmer), in [0, 1]: {key: [one per prompt]}.

    Element i of both sequences belongs to the same prompt, so two policies' lists pair up
    for `paired_win_rate`.
    """
    if len(predictions) != len(references):
        raise ValueError(f"length mismatch: {len(predictions)} vs {len(references)}")
    if len(predictions) == 0:
        raise ValueError("ROUGE needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    # scorer.score's signature is (target, prediction)
    return {key: [score[key].fmeasure for score in scores] for key in keys}


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (rouge_score, Porter stemmer), averaged over prompts, in [0, 1]."""
    per_example = rouge_f1_per_example(predictions, references)
    return {key: sum(values) / len(values) for key, values in per_example.items()}


def bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and 4-gram precision from ``sacrebleu.corpus_bleu`` (0-100 scale).

    ``bleu`` is the real BLEU (geometric mean of 1-4-gram precisions times
    the brevity penalty). ``precision_4gram`` is ``precisions[3]``, the
    number the study reported as "BLEU-4"; we report both, correctly named.
    """
    if len(predictions) != len(references):
        raise ValueError(f"length mismatch: {len(predictions)} vs {len(references)}")
    result = sacrebleu.corpus_bleu(list(predictions), [list(references)])
    return {"bleu": float(result.score), "precision_4gram": float(result.precisions[3])}
