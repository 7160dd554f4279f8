import pytest

from gradaudit import GradAuditError
from gradaudit.scoring.metrics import METRIC_CONFIG, score


def test_identical_text_scores_one_everywhere():
    s = score(["the movie was great ."], ["the movie was great ."])
    assert (s.rouge1, s.rouge2, s.rougeL, s.token_recall, s.exact) == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_empty_prediction_scores_zero():
    s = score(["a charming film"], [""])
    assert (s.rouge1, s.rouge2, s.token_recall, s.exact) == (0.0, 0.0, 0.0, 0.0)


def test_special_tokens_are_stripped_from_both_sides():
    s = score(["[CLS] a charming film [SEP]"], ["a charming film [SEP] [PAD] [PAD]"])
    assert s.rouge1 == 1.0 and s.exact == 1.0


def test_permuted_batch_is_matched_by_hungarian_assignment():
    refs = ["the plot was boring", "a very charming actress", "music and story"]
    s = score(refs, [refs[2], refs[0], refs[1]])
    assert s.rouge1 == 1.0
    assert sorted((x.reference, x.reconstruction) for x in s.sentences) == [(0, 1), (1, 2), (2, 0)]


def test_words_exchanged_between_sentences_keep_the_batch_rouge1_only():
    refs = ["it 's a charming and often affecting journey .", "the plot is nothing but boring ."]
    recs = ["it 's a charming nothing but boring .", "the plot is and often affecting journey ."]
    s = score(refs, recs)
    assert s.batch_rouge1 == 1.0 and s.rouge1 < 0.6 and s.exact == 0.0
    assert score(refs, ["music the slow movie .", "never help card bank ."]).batch_rouge1 < 0.2


def test_bag_of_words_gets_rouge1_but_not_rouge2_or_recall():
    s = score(["the cast was great"], ["great was cast the"])
    assert s.rouge1 == 1.0
    assert s.rouge2 == 0.0
    assert s.token_recall == 0.0


def test_token_recall_counts_ids_at_their_position():
    s = score(
        ["a b c d"], ["a x c y"], reference_ids=[[1, 2, 3, 4]], reconstruction_ids=[[1, 9, 3, 8]]
    )
    assert s.token_recall == 0.5


def test_partial_overlap_rouge1_is_the_f_measure():
    s = score(["one two three four"], ["one two"])
    assert s.rouge1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_configuration_is_written_into_every_result():
    assert score(["a"], ["a"]).config == METRIC_CONFIG
    assert "use_stemmer=False" in METRIC_CONFIG["rouge"]


def test_mismatched_counts_are_an_error():
    with pytest.raises(GradAuditError, match="2 references but 1"):
        score(["a", "b"], ["a"])


def test_canary_exposure_counts_secret_words_recovered_anywhere():
    from gradaudit.scoring.metrics import canary_exposure

    assert canary_exposure("maria delgado 4417", "hi maria , 4417 is mine") == 2 / 3
    assert canary_exposure("4417 4417", "4417") == 0.5
    assert canary_exposure("peter", "[CLS] nothing here [SEP]") == 0.0
    with pytest.raises(GradAuditError, match="at least one word"):
        canary_exposure(" , ", "x")
