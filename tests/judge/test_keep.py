"""Which answers a group with a true label keeps: a right answer anywhere in the N."""

from judge import keep_both


def test_one_right_answer_late_in_the_samples_is_kept_with_wrong_ones():
    assert keep_both([0, 0, 0, 0, 0, 0, 0, 1], 4) == [0, 1, 2, 7]


def test_many_right_answers_fill_half_the_group_wrong_ones_the_rest():
    assert keep_both([1, 1, 1, 1, 1, 0, 1, 0], 4) == [0, 1, 5, 7]


def test_too_few_wrong_answers_the_rest_are_right():
    assert keep_both([1, 1, 1, 0, 1, 1], 4) == [0, 1, 2, 3]


def test_all_rewards_equal_or_fewer_samples_than_g_first_ones_in_order():
    assert keep_both([0.0] * 6, 4) == [0, 1, 2, 3]
    assert keep_both([1.0, 0.0], 8) == [0, 1]
