"""Scores of answers against references: what `qlora eval` reports for a user's own data."""

from __future__ import annotations

import pytest

from qlora_cli.eval.scoring import chrf, exact_match, normalize_answer, score_answers, token_f1


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert normalize_answer("  The capital of France is  Paris. ") == "capital of france is paris"
    assert exact_match("paris", "Paris.") == 1.0
    assert exact_match("The answer: 56!", "answer 56") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0


def test_token_f1_counts_shared_words():
    # answer 4 words, reference 2, both shared: precision 1/2, recall 1
    assert token_f1("Jupiter is largest planet", "Jupiter planet") == pytest.approx(2 / 3)
    assert token_f1("Berlin", "Paris") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "Paris") == 0.0


PAIRS = [
    ("The capital of France is Paris.", "The capital of France is Paris."),
    ("Buenos dias", "Buenos días."),
    ("7 times 8 is 54.", "7 times 8 is 56."),
    ("Saturn", "Jupiter is the largest planet in the solar system."),
    ("ok", "Joyful."),
    ("Paris is the capital", "Paris"),  # a reference with no 6-grams: its answer's 6-grams are not counted
]


# sacreBLEU 2.6's chrF of PAIRS, computed once and stored: they pin the default settings we report
# (character 6-grams, no word n-grams, beta 2); chrF++ (word order 2), beta 1 or char order 5 each
# change the corpus score by 0.16 or more.
CORPUS_CHRF = 47.98506945647328
SENTENCE_CHRF = [100.0, 56.91678603188189, 79.61519961519961, 2.3946360153256703, 8.333333333333332, 54.42312184297351]


def test_chrf_is_sacrebleu_default_chrf_of_the_corpus_and_of_each_pair():
    answers, references = zip(*PAIRS)
    assert chrf(list(answers), list(references)) == pytest.approx(CORPUS_CHRF, abs=1e-9)
    for (answer, reference), expected in zip(PAIRS, SENTENCE_CHRF):
        assert chrf([answer], [reference]) == pytest.approx(expected, abs=1e-9)


def test_chrf_is_100_for_identical_and_0_for_disjoint_text():
    assert chrf(["Paris"], ["Paris"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == 0.0


def test_score_answers_averages_over_pairs():
    scores = score_answers(["Paris", "Berlin"], ["Paris.", "Rome"])
    assert scores["exact_match"] == 0.5 and scores["token_f1"] == 0.5
    assert 0 < scores["chrf"] < 100
