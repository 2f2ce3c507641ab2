"""The `auto` method: extraction rate and the TTRL-or-judge choice."""

from judge.auto import choose_method, extraction_rate


def test_extraction_rate_counts_only_real_answers():
    assert extraction_rate(["42", None, "", "  ", "B"]) == 0.4


def test_extraction_rate_empty_returns_zero():
    assert extraction_rate([]) == 0.0


def test_choose_method_math_answers_returns_ttrl():
    texts = [r"so \boxed{12}", "The answer is 12.", "Answer: 13", "I am not sure."]
    assert choose_method(texts) == "ttrl"


def test_choose_method_chat_replies_returns_judge():
    texts = [
        "Here are 3 tips for better sleep: keep a schedule, dim the lights, no screens.",
        "Try a warm bath at 9 pm and skip coffee after 2.",
        "Sleep matters. Aim for 7 to 9 hours.",
    ]
    assert choose_method(texts) == "judge"


def test_choose_method_threshold_is_inclusive():
    texts = ["Answer: 4", "No idea."]
    assert choose_method(texts, threshold=0.5) == "ttrl"
    assert choose_method(texts, threshold=0.6) == "judge"


def test_choose_method_no_texts_returns_judge():
    assert choose_method([]) == "judge"


def test_choose_method_equation_results_returns_ttrl():
    # SmolLM2-135M's own replies to "What is 16 + 7?" and the like, from a real prompt log:
    # no "The answer is", but an equation's result, which the vote can use.
    texts = [
        "16 + 7 = 9.",
        "To add 18 and 24, you just need to follow the mental equation: 18 + 24 = 36.",
        "13 + 22 equals 35. Added together gives you a total of 35.",
        "To solve this, you need to view the problem carefully.",
    ]
    assert choose_method(texts) == "ttrl"


def test_choose_method_equals_sign_without_a_number_returns_judge():
    texts = [
        "Friendship = trust + time, in 2 words.",
        "A good friend listens; kindness equals respect.",
        "Pick 3 friends who make you laugh.",
    ]
    assert choose_method(texts) == "judge"


def test_choose_method_arithmetic_question_counts_any_number_returns_ttrl():
    # SmolLM2-135M's replies to "What is 19 + 23?": numbers, but no "=" and no cue.
    texts = [
        "To add 19 and 23, you add them like 19 + 23, which is 32.",
        "You get 42 when you add them.",
        "The sum is 42.",
        "I like numbers.",
    ]
    assert choose_method(texts) == "judge"  # without the question: no anchored answer
    assert choose_method(texts, prompt="What is 19 + 23?") == "ttrl"
    assert choose_method(texts, prompt="What is 7 - 3?") == "ttrl"


def test_choose_method_dates_and_tips_are_not_arithmetic_questions():
    texts = ["Here are 3 tips for better sleep.", "Sleep 8 hours.", "Try 2 things."]
    assert choose_method(texts, prompt="What happened on 2024-11-23?") == "judge"
    assert choose_method(texts, prompt="Give me 3 tips for better sleep.") == "judge"
