"""The stated-result vote, on replies SmolLM2-135M really gave (bench samples, T=1)."""

from judge import (
    consistent_rewards,
    majority_vote,
    stated_equation,
    stated_result,
    verified,
    vote_answers,
)
from judge.extract import extract_answers

PROMPT = "Calculate 9 plus 4."
REPLIES = [
    "To calculate 9 plus 4, you simply add: 9 + 4 = 13.",
    "To calculate 9 + 4, we'll add the numbers 9 and 4 together. \n\n9 + 4 = 13 \n\n"
    "Adding a number 2 times with a multiplier effectively creates a single addition.",
    "To calculate 9 plus 4, we can think about adding multiples of 9: since 9 = 4 * 1, "
    "the answer is 4*4 + 9.",
    "9 + 4 = 12, since counting on from 9 gives 12.",
]


def test_stated_result_reads_the_equation_over_the_prompts_numbers_not_the_last_number():
    assert [stated_result(t, PROMPT) for t in REPLIES] == ["13", "13", None, "12"]
    # the last-number extractor reads the rambling tail instead
    assert extract_answers(REPLIES)[1] != "13"


def test_stated_result_ignores_equations_over_other_numbers_and_chains():
    prompt = "Each of 4 bags holds 12 marbles. How many marbles are there altogether?"
    text = "There are 6 bags, 2 + 3 = 5. In 1 bag, 12 * 4 = 54 marbles."
    assert stated_result(text, prompt) == "54"  # wrong, but what it says: the vote decides
    assert stated_result("So 4 + 12 = 16 + 2 = 18", prompt) is None  # a chain's head is no result
    assert stated_result("12 x 4 equals 48.", prompt) == "48"
    assert stated_result("anything = 5", "What is the capital of France?") is None


def test_stated_equation_checks_the_arithmetic_of_the_reply_itself():
    prompt = "Each of 4 bags holds 12 marbles. How many marbles are there altogether?"
    assert stated_equation("12 * 4 = 54 marbles.", prompt) == ("54", False)
    assert stated_equation("12 x 4 equals 48.", prompt) == ("48", True)
    assert stated_equation("4 × 12 = 48", prompt) == ("48", True)
    assert stated_equation("12 - 4 = 8", prompt) == ("8", True)  # true, if not what was asked
    assert stated_equation("12 / 4 = 3", prompt) == ("3", True)
    assert stated_equation("4 / 12 = 0.33", prompt) == ("0.33", True)  # to the places it gives
    assert stated_equation("4 / 12 = 0.3", prompt) == ("0.3", True)
    assert stated_equation("4 / 12 = 0.4", prompt) == ("0.4", False)
    assert stated_equation("12 / 0 = 4", "What is 12 / 0?") == ("4", False)
    assert stated_equation("The answer is 48.", prompt) is None


def test_vote_counts_only_stated_results_that_hold():
    finals = extract_answers(REPLIES)
    voted = vote_answers(REPLIES, PROMPT, finals)
    # reply 3 says 9 + 4 = 12: its own working is false, so it has no vote
    assert voted == ["13", "13", None, None]
    assert verified(REPLIES, PROMPT)
    vote = majority_vote(voted)
    assert (vote.label, vote.ratio) == ("13", 0.5)
    # a group whose every equation is false has nothing to vote on
    wrong = ["9 + 4 = 12.", "9 + 4 = 14, so 14."]
    assert vote_answers(wrong, PROMPT, extract_answers(wrong)) == [None, None]
    assert not verified(wrong, PROMPT)
    # facts (no equation anywhere) vote on final answers as before
    facts = ["The answer is Paris.", "The answer is Rome."]
    assert vote_answers(facts, "Capital of France?", extract_answers(facts)) == ["Paris", "Rome"]


def test_consistent_rewards_only_for_samples_that_end_on_the_label_by_true_working():
    finals = extract_answers(REPLIES)
    vote = majority_vote(vote_answers(REPLIES, PROMPT, finals))
    # reply 0 states 13 and ends on 13; reply 1 states 13 but ends on another number
    assert consistent_rewards(vote.label, finals, REPLIES, PROMPT) == [1.0, 0.0, 0.0, 0.0]
    # no working at all but the label: rewarded; the label through a false step: not
    texts = ["The answer is 13.", "9 + 4 = 12, plus one: 13."]
    assert consistent_rewards(vote.label, extract_answers(texts), texts, PROMPT) == [1.0, 0.0]
    assert consistent_rewards(None, [None, None], ["", ""], PROMPT) == [0.0, 0.0]
