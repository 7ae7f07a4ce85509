"""ptutils.support.schedule: TFUtils' save schedule in closed form (spec §4.3, §4.4), against tfutils' own test numbers
and against a step-by-step re-enactment of ``train()`` and ``DBInterface.save``."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ptutils.support import SaveGroup
from ptutils.support.schedule import (
    Counts, cache_steps, expected_counts, filter_steps, last_step, plan, recent_kept, record_steps,
    records_per_test_run, validation_steps,
)

# tfutils/tests/test_base.py: save_valid_freq=20, save_filters_freq=200, cache_filters_freq=100, metrics 100.
TFUTILS_TEST = SaveGroup(exp_id="training0", save_valid_freq=20, save_filters_freq=200, cache_filters_freq=100)


def reenact(save: SaveGroup, start: int, end: int, validate_first: bool = True, restored: bool = False,
            recent: list[int] | None = None) -> tuple[list[dict], list[int]]:
    """TFUtils' train() and DBInterface.save() step by step (tfutils/train.py:452-505, db_interface.py:679-846)."""
    records: list[dict] = []
    recent = [] if recent is None else recent
    pending: dict | None = None

    def save_call(step: int, train_res: bool, valid_res: bool) -> None:
        nonlocal pending
        rec = pending if pending is not None else {"train_results": [], "validation": False}
        pending = rec
        rec["step"] = step
        if train_res:
            rec["train_results"].append(step)
        if valid_res:
            rec["validation"] = True
        initial_ok = step > 0 or (save.save_initial_filters and not restored)
        perm = step % save.save_filters_freq == 0 and initial_ok
        tmp = step % save.cache_filters_freq == 0 and initial_ok
        need = perm or tmp or step % save.save_metrics_freq == 0 or step % save.save_valid_freq == 0
        if save.do_save and need:
            pending = None
            rec["saved_filters"] = perm
            rec["cached"] = tmp and not perm
            if rec["cached"]:
                recent.append(step)
                if len(recent) > save.cache_max_num:
                    del recent[:len(recent) - save.cache_max_num]
            records.append(rec)

    step = start
    if step >= end:
        return records, recent
    if step == 0 and validate_first:
        save_call(0, train_res=False, valid_res=True)
    while step < end:
        step += 1
        save_call(step, train_res=True, valid_res=step % save.save_valid_freq == 0)
    return records, recent


def check_against_reenactment(save: SaveGroup, start: int, end: int, validate_first: bool, restored: bool) -> None:
    records, recent = reenact(save, start, end, validate_first, restored)
    planned = plan(save, start, end, validate_first=validate_first, restored=restored)
    assert [(p.step, list(p.train_steps), p.validation, p.saved_filters, p.cached) for p in planned] == [
        (r["step"], r["train_results"], r["validation"], r["saved_filters"], r["cached"]) for r in records]
    assert record_steps(save, start, end, validate_first=validate_first) == [r["step"] for r in records]
    assert filter_steps(save, start, end, validate_first=validate_first, restored=restored) == [
        r["step"] for r in records if r["saved_filters"]]
    assert validation_steps(save, start, end, validate_first=validate_first) == [
        r["step"] for r in records if r["validation"]]
    assert recent_kept(cache_steps(save, start, end), save.cache_max_num) == recent
    written = {s for r in records for s in r["train_results"]}
    assert expected_counts(save, start, end, validate_first=validate_first, restored=restored) == Counts(
        records=len(records),
        saved_filters=sum(r["saved_filters"] for r in records),
        validations=sum(r["validation"] for r in records),
        cached=sum(r["cached"] for r in records),
        recent_kept=len(recent),
        unwritten_steps=max(0, end - start) - len(written),
    )


# --- tfutils' own test numbers --------------------------------------------------------------------------


def test_a_fresh_500_step_run_writes_26_records_and_filters_at_0_200_400():
    assert expected_counts(TFUTILS_TEST, 0, 500).records == 26
    assert filter_steps(TFUTILS_TEST, 0, 500) == [0, 200, 400]
    assert record_steps(TFUTILS_TEST, 0, 500)[:3] == [0, 20, 40]


def test_continuing_the_same_exp_id_to_1000_adds_25_records():
    assert expected_counts(TFUTILS_TEST, 500, 1000, restored=True).records == 25
    assert filter_steps(TFUTILS_TEST, 0, 500) + filter_steps(TFUTILS_TEST, 500, 1000, restored=True) == [
        0, 200, 400, 600, 800, 1000]


def test_a_new_exp_id_loaded_at_1000_and_run_to_1500_filters_at_1200_1400():
    assert filter_steps(TFUTILS_TEST, 1000, 1500, restored=True) == [1200, 1400]


def test_with_the_default_valid_and_filter_freqs_500_steps_give_5_train_result_records():
    save = SaveGroup(save_valid_freq=3000, save_filters_freq=30000, cache_filters_freq=3000)
    assert [p.step for p in plan(save, 0, 500) if p.train_steps] == [100, 200, 300, 400, 500]
    assert len(plan(save, 0, 500)[1].train_steps) == 100


# --- the spec's caveats ---------------------------------------------------------------------------------


def test_validate_first_false_writes_no_step_0_record_and_no_initial_checkpoint():
    save = SaveGroup(save_initial_filters=True)
    assert record_steps(save, 0, 300, validate_first=False) == [100, 200, 300]
    assert filter_steps(save, 0, 300, validate_first=False) == []


def test_save_initial_filters_false_or_loaded_weights_give_a_step_0_record_without_checkpoint():
    assert plan(SaveGroup(save_initial_filters=False), 0, 100)[0].saved_filters is False
    first = plan(SaveGroup(), 0, 100, restored=True)[0]
    assert (first.step, first.saved_filters, first.validation) == (0, False, True)


def test_nothing_is_written_at_the_resume_step_itself():
    assert record_steps(SaveGroup(), 300, 500) == [400, 500]


def test_a_run_at_or_past_num_steps_is_cancelled_and_writes_nothing():
    assert record_steps(SaveGroup(), 500, 500) == []
    assert record_steps(SaveGroup(), 0, 0) == []
    assert expected_counts(SaveGroup(), 600, 500).records == 0


def test_the_tail_after_the_last_write_point_is_never_written():
    counts = expected_counts(SaveGroup(), 0, 250)
    assert (counts.records, counts.unwritten_steps) == (3, 50)


def test_do_save_false_writes_nothing():
    assert expected_counts(SaveGroup(do_save=False), 0, 1000) == Counts(0, 0, 0, 0, 0, 1000)


def test_cache_steps_skip_permanent_ones_and_recent_keeps_cache_max_num():
    save = SaveGroup(save_filters_freq=300, cache_filters_freq=100, cache_max_num=2)
    assert cache_steps(save, 0, 700) == [100, 200, 400, 500, 700]
    assert recent_kept(cache_steps(save, 0, 700), save.cache_max_num) == [500, 700]
    assert expected_counts(save, 700, 800, restored=True, recent_before=2).recent_kept == 2


def test_num_steps_as_a_float_runs_to_its_ceiling():
    assert last_step(1281167 / 256 * 90) == 450411
    assert last_step(500) == 500
    with pytest.raises(ValueError):
        last_step(float("inf"))


def test_closed_form_counts_hold_for_an_imagenet_length_run():
    save = SaveGroup(save_metrics_freq=200, save_valid_freq=10000, save_filters_freq=30000,
                     cache_filters_freq=50000, save_initial_filters=False)
    counts = expected_counts(save, 0, last_step(1281167 / 256 * 90), validate_first=False)
    assert counts == Counts(records=450411 // 200, saved_filters=15, validations=45, cached=6, recent_kept=6,
                            unwritten_steps=450411 % 200)


def test_test_runs_write_the_intermediate_records_and_one_final():
    assert records_per_test_run([10, 7], save_intermediate_freq=3) == 4 + 3 + 1
    assert records_per_test_run([10, 7]) == 1


# --- closed form == re-enactment ------------------------------------------------------------------------


@pytest.mark.parametrize("start,end", [(0, 500), (500, 1000), (0, 1), (199, 201), (1000, 1500), (0, 0)])
def test_tfutils_test_schedule_matches_the_reenactment(start, end):
    check_against_reenactment(TFUTILS_TEST, start, end, validate_first=True, restored=start > 0)


freq = st.integers(min_value=1, max_value=40)


@settings(max_examples=400, deadline=None)
@example(m=100, v=20, f=200, c=100, keep=6, start=0, length=300, validate_first=False, restored=False, initial=True,
         do_save=True)
@example(m=7, v=5, f=3, c=2, keep=1, start=0, length=30, validate_first=True, restored=True, initial=True,
         do_save=True)
@given(m=freq, v=freq, f=freq, c=freq, keep=st.integers(0, 5), start=st.just(0) | st.integers(0, 150),
       length=st.integers(-5, 200), validate_first=st.booleans(), restored=st.booleans(), initial=st.booleans(),
       do_save=st.booleans())
def test_the_closed_form_matches_the_reenactment(m, v, f, c, keep, start, length, validate_first, restored,
                                                 initial, do_save):
    save = SaveGroup(save_metrics_freq=m, save_valid_freq=v, save_filters_freq=f, cache_filters_freq=c,
                     cache_max_num=keep, save_initial_filters=initial, do_save=do_save)
    check_against_reenactment(save, start, start + length, validate_first, restored)
