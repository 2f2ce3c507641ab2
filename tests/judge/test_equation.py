"""The stated-result vote, on replies SmolLM2-135M really gave (bench samples, T=1)."""

from judge import consistent_rewards, majority_vote, stated_result, vote_answers
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


def test_vote_uses_stated_results_when_any_sample_states_one():
    finals = extract_answers(REPLIES)
    voted = vote_answers(REPLIES, PROMPT, finals)
    assert voted == ["13", "13", None, "12"]
    vote = majority_vote(voted)
    assert (vote.label, vote.ratio) == ("13", 0.5)
    # facts (no equation anywhere) vote on final answers as before
    facts = ["The answer is Paris.", "The answer is Rome."]
    assert vote_answers(facts, "Capital of France?", extract_answers(facts)) == ["Paris", "Rome"]


def test_consistent_rewards_only_for_samples_that_also_end_on_the_label():
    finals = extract_answers(REPLIES)
    vote = majority_vote(vote_answers(REPLIES, PROMPT, finals))
    # reply 0 states 13 and ends on 13; reply 1 states 13 but ends on another number
    assert consistent_rewards(vote, finals) == [1.0, 0.0, 0.0, 0.0]
    assert consistent_rewards(majority_vote([None, None]), [None, None]) == [0.0, 0.0]
