"""Scores of generated answers against reference answers: plain functions from text to numbers.

exact match and token F1 follow SQuAD's normalisation (lower case, no punctuation, no articles,
single spaces), so `Paris.` matches `paris`; chrF is sacreBLEU's default chrF (character 1- to
6-grams, whitespace removed, beta 2, corpus statistics), on its 0-100 scale.
"""

from __future__ import annotations

import re
import string
from collections import Counter

CHRF_ORDER = 6
CHRF_BETA = 2
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, without punctuation or articles, words separated by single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize_answer(answer) == normalize_answer(reference))


def token_f1(answer: str, reference: str) -> float:
    """F1 of the normalised words the answer shares with the reference (each word counted once per use)."""
    predicted, expected = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def chrf(answers: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100): the n-gram counts of all pairs summed, then one F-score."""
    totals = [[0, 0, 0] for _ in range(CHRF_ORDER)]  # per order: answer n-grams, reference n-grams, shared
    for answer, reference in zip(answers, references, strict=True):
        for order, counts in enumerate(_chrf_counts(answer, reference)):
            totals[order] = [t + c for t, c in zip(totals[order], counts)]
    return _chrf_score(totals)


def _chrf_counts(answer: str, reference: str) -> list[tuple[int, int, int]]:
    answer, reference = "".join(answer.split()), "".join(reference.split())
    counts = []
    for n in range(1, CHRF_ORDER + 1):
        ours, theirs = _ngrams(answer, n), _ngrams(reference, n)
        counts.append((sum(ours.values()), sum(theirs.values()), sum((ours & theirs).values())))
    return counts


def _ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def _chrf_score(totals: list[list[int]]) -> float:
    # sacreBLEU's default: precision and recall averaged over the orders that both sides have
    # (a 3-character answer has no 6-grams), then one F-beta of the averages.
    present = [(shared / ours, shared / theirs) for ours, theirs, shared in totals if ours and theirs]
    if not present:
        return 0.0
    precision = sum(p for p, _ in present) / len(present)
    recall = sum(r for _, r in present) / len(present)
    if not precision + recall:
        return 0.0
    factor = CHRF_BETA ** 2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


def score_answers(answers: list[str], references: list[str]) -> dict[str, float]:
    """exact_match and token_f1 (means over the pairs, 0-1) and corpus chrF (0-100)."""
    pairs = list(zip(answers, references, strict=True))
    return {
        "exact_match": sum(exact_match(a, r) for a, r in pairs) / len(pairs),
        "token_f1": sum(token_f1(a, r) for a, r in pairs) / len(pairs),
        "chrf": chrf(answers, references),
    }
