"""The one round policy (agile_pipeline.lib.loop.plan_round): what a round would do now."""

import pytest

from agile_pipeline.lib.loop import RoundFacts, plan_round


def facts(n_pos=3, n_neg=5, cutoff=10, last=None, last_cutoff=None, kind="expansion", batch_cutoff=0):
    return RoundFacts("cats", n_pos, n_neg, cutoff, last, last_cutoff, kind, batch_cutoff)


def test_first_round_trains_round_zero():
    p = plan_round(facts())
    assert (p.action, p.round_index) == ("train", 0)
    assert "3 positive / 5 negative" in p.reason


def test_new_labels_train_the_next_round():
    p = plan_round(facts(cutoff=20, last=2, last_cutoff=10, kind="al", batch_cutoff=10))
    assert (p.action, p.round_index) == ("train", 3)


@pytest.mark.parametrize("rater_request", [False, True])
def test_no_positive_is_a_recovery_batch_for_the_pipeline_and_refused_for_a_rater(rater_request):
    p = plan_round(facts(n_pos=0, n_neg=7), rater_request=rater_request)
    if rater_request:
        assert p.action == "refuse" and "no image is rated positive yet for 'cats' (7 negative)" in p.reason
    else:
        assert p.action == "recovery" and "no positive labels yet for 'cats' (7 negative)" in p.reason
        assert "recovery batch" in p.reason


def test_nothing_new_reuses_the_model_or_retrains_when_forced():
    f = facts(cutoff=10, last=1, last_cutoff=10, kind="al", batch_cutoff=10)
    assert (plan_round(f).action, plan_round(f).round_index) == ("reuse", 1)
    assert (plan_round(f, force=True).action, plan_round(f, force=True).round_index) == ("train", 1)


def test_a_rater_asking_again_before_rating_the_al_batch_is_refused():
    f = facts(cutoff=10, last=1, last_cutoff=10, kind="al", batch_cutoff=10)
    p = plan_round(f, rater_request=True)
    assert p.action == "refuse" and p.reason.startswith("nothing new was rated since round 1")
    # after an expansion batch (no AL batch from that model yet) the rater may ask: reuse
    assert plan_round(facts(cutoff=10, last=1, last_cutoff=10, kind="expansion"),
                      rater_request=True).action == "reuse"
