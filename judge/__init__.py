"""Reward functions: answer extraction, majority vote, LLM-as-judge, preference pairs.

Pure functions: no I/O and no settings (values are passed in as arguments).
"""

from judge.auto import choose_method, extraction_rate
from judge.equation import (
    consistent_rewards,
    stated_equation,
    stated_result,
    verified,
    vote_answers,
)
from judge.extract import extract_answer, extract_answers
from judge.keep import keep_both
from judge.llm_score import JUDGE_TEMPLATE, judge_messages, judge_rewards, mean_score, parse_score
from judge.pairs import Pair, select_pair
from judge.vote import VoteResult, answer_entropy, majority_vote, same_answer, ttrl_rewards

__all__ = [
    "JUDGE_TEMPLATE",
    "Pair",
    "VoteResult",
    "answer_entropy",
    "choose_method",
    "consistent_rewards",
    "extract_answer",
    "extract_answers",
    "extraction_rate",
    "judge_messages",
    "judge_rewards",
    "keep_both",
    "majority_vote",
    "mean_score",
    "parse_score",
    "same_answer",
    "select_pair",
    "stated_equation",
    "stated_result",
    "ttrl_rewards",
    "verified",
    "vote_answers",
]
