"""Scores of generated answers against reference answers: plain functions from text to numbers.

exact match and token F1 follow SQuAD's normalisation (lower case, no punctuation, no articles,
single spaces), so `Paris.` matches `paris`; chrF is sacreBLEU's own default chrF (character 1- to
6-grams, whitespace removed, beta 2, corpus statistics), on its 0-100 scale.
"""

from __future__ import annotations

import re
import string
from collections import Counter

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
    from sacrebleu.metrics import CHRF  # 0.1 s to import (lxml, tabulate): only when scoring

    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    return CHRF().corpus_score(answers, [references]).score


def score_answers(answers: list[str], references: list[str]) -> dict[str, float]:
    """exact_match and token_f1 (means over the pairs, 0-1) and corpus chrF (0-100)."""
    pairs = list(zip(answers, references, strict=True))
    return {
        "exact_match": sum(exact_match(a, r) for a, r in pairs) / len(pairs),
        "token_f1": sum(token_f1(a, r) for a, r in pairs) / len(pairs),
        "chrf": chrf(answers, references),
    }
