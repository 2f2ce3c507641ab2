"""Labeled questions with gold answers: small arithmetic and short factual answers.

What they are for: measuring how right the label-free rewards are (bench/rewards.py), the
worker's probe file (`STROP_PROBE_FILE`, read by worker/probe.py: label and reward
accuracy for monitoring only) and `strop demo`'s traffic and held-out set. Gold answers
never reach a reward. The file format is `strop/labeled.py`'s.

A set is a pure function of `(n, seed, kinds)`: the same arguments give the same
questions in the same order, on any machine and Python run (one `random.Random(seed)`,
no hash-ordered iteration).

Format choices, for SmolLM2-135M-Instruct and judge/extract.py:
- arithmetic is asked plainly ("What is 17 + 25?"): the model answers "17 + 25 = 42"
  and the extractor's last-number step reads it; operands are small, so a 135M model
  gets some right;
- short answers end with a cue to start with "The answer is": a word answer ("Paris")
  is extracted only after such a phrase (or `Answer:`/`\\boxed{}`), never from "The
  capital of France is Paris.".
"""

import random
from collections.abc import Sequence

from strop.labeled import Kind, LabeledQuestion

KINDS: tuple[Kind, ...] = ("arithmetic", "short")  # what make_labeled_set draws from

SHORT_CUE = 'Start your reply with "The answer is".'
"""Appended to every short-answer question (see the module docstring)."""

# (question, gold answer). Only questions with one unambiguous, short gold answer: the
# judge compares strings (and math), so "Pacific" vs "the Pacific Ocean" would be a miss.
SHORT_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of Poland?", "Warsaw"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Peru?", "Lima"),
    ("What is the capital of Thailand?", "Bangkok"),
    ("What is the capital of South Korea?", "Seoul"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("How many legs does a dog have?", "4"),
    ("How many arms does an octopus have?", "8"),
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("How many seconds are in a minute?", "60"),
    ("How many days are in a leap year?", "366"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many sides does a hexagon have?", "6"),
    ("How many wheels does a bicycle have?", "2"),
    ("How many continents are there on Earth?", "7"),
    ("How many planets are in the Solar System?", "8"),
    ("How many letters are in the English alphabet?", "26"),
    ("How many cents are in a US dollar?", "100"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("At what temperature in degrees Celsius does water freeze?", "0"),
    ("What color is a ripe banana?", "yellow"),
    ("What color is fresh grass?", "green"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is fresh snow?", "white"),
    ("What color is coal?", "black"),
    ("What color is a ripe tomato?", "red"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in the Solar System?", "Jupiter"),
    ("What is the chemical symbol for gold?", "Au"),
)

# Operand ranges: small, so a 135M model answers some correctly (a vote needs signal).
ADD_RANGE = (2, 30)  # a + b, both in range
SUB_RANGE = (5, 40)  # a - b with 1 <= b < a: answers are positive
MUL_RANGE = (2, 12)  # times tables


def make_labeled_set(n: int, seed: int, kinds: Sequence[Kind] = KINDS) -> list[LabeledQuestion]:
    """`n` distinct labeled questions, deterministic from `seed`, in shuffled order.

    With both kinds, half are short-answer questions (as many as the built-in list has:
    `len(SHORT_QUESTIONS)`) and the rest arithmetic. Raises ValueError when `n` is more
    than the asked kinds can give without repeating a prompt.

    Example:
        >>> qs = make_labeled_set(4, seed=0)
        >>> len(qs), qs == make_labeled_set(4, seed=0), sorted({q.kind for q in qs})
        (4, True, ['arithmetic', 'short'])
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    n_short = 0
    if "short" in kinds:
        wanted = n if "arithmetic" not in kinds else (n + 1) // 2
        if "arithmetic" not in kinds and wanted > len(SHORT_QUESTIONS):
            raise ValueError(f"only {len(SHORT_QUESTIONS)} short-answer questions exist")
        n_short = min(wanted, len(SHORT_QUESTIONS))
    questions = [_short(q, a) for q, a in rng.sample(SHORT_QUESTIONS, n_short)]
    questions += _arithmetic(n - n_short, rng)
    rng.shuffle(questions)  # mix the kinds, so any prefix of a set has both
    return questions


def _short(question: str, answer: str) -> LabeledQuestion:
    return LabeledQuestion(f"{question} {SHORT_CUE}", answer, "short")


def _arithmetic(n: int, rng: random.Random) -> list[LabeledQuestion]:
    """`n` distinct arithmetic questions, + - and × equally likely."""
    space = _arithmetic_space()
    if n > space:
        raise ValueError(f"only {space} distinct arithmetic questions exist, asked for {n}")
    seen: set[str] = set()
    out: list[LabeledQuestion] = []
    while len(out) < n:
        op = rng.choice("+-×")
        if op == "+":
            a, b = rng.randint(*ADD_RANGE), rng.randint(*ADD_RANGE)
            value = a + b
        elif op == "-":
            a = rng.randint(*SUB_RANGE)
            b = rng.randint(1, a - 1)
            value = a - b
        else:
            a, b = rng.randint(*MUL_RANGE), rng.randint(*MUL_RANGE)
            value = a * b
        prompt = f"What is {a} {op} {b}?"
        if prompt not in seen:  # a repeated prompt would be one question counted twice
            seen.add(prompt)
            out.append(LabeledQuestion(prompt, str(value), "arithmetic"))
    return out


def _arithmetic_space() -> int:
    """How many distinct arithmetic prompts the ranges allow."""
    add = (ADD_RANGE[1] - ADD_RANGE[0] + 1) ** 2
    sub = sum(a - 1 for a in range(SUB_RANGE[0], SUB_RANGE[1] + 1))
    mul = (MUL_RANGE[1] - MUL_RANGE[0] + 1) ** 2
    return add + sub + mul


# --- the learning benchmark's stream and held-out set ----------------------------------------
#
# Three skills (bare arithmetic, one-step word problems, short facts), each asked in two
# disjoint sets of wordings: the stream of unlabeled traffic uses the first, the held-out
# set the second (and other facts), so a lift on the held-out set is a skill learned, not
# a prompt memorised.

ARITHMETIC_WORDINGS = {
    "stream": ("What is {a} {op} {b}?", "{a} {op} {b} = ?"),
    "held_out": ("Compute {a} {op} {b}.", "Calculate {a} {word} {b}."),
}
OP_WORDS = {"+": "plus", "-": "minus", "×": "times"}
WORD_PROBLEMS = {  # (template, operation); {a} and {b} as in the arithmetic ranges
    "stream": (
        ("Tom has {a} apples and buys {b} more. How many apples does he have now?", "+"),
        ("A shelf holds {a} books. {b} are taken away. How many books are left?", "-"),
        ("There are {a} boxes with {b} pens in each box. How many pens are there?", "×"),
        ("Sara had {a} stickers and gave {b} to a friend. How many stickers does she have?", "-"),
    ),
    "held_out": (
        ("A farmer counts {a} cows, then {b} more arrive. How many cows are there in all?", "+"),
        ("A bus carries {a} people and {b} get off. How many people are still on the bus?", "-"),
        ("Each of {a} bags holds {b} marbles. How many marbles are there altogether?", "×"),
        ("A jar has {a} coins and {b} more are dropped in. How many coins are in the jar?", "+"),
    ),
}


def make_learning_set(n: int, seed: int, part: str) -> list[LabeledQuestion]:
    """`n` distinct questions of the learning benchmark, a third of each skill, in the
    wordings (and facts) of `part`: `stream` (the unlabeled traffic) or `held_out`."""
    if part not in ("stream", "held_out"):
        raise ValueError(f"part must be stream or held_out, got {part!r}")
    rng = random.Random(f"{part}:{seed}")
    facts = SHORT_QUESTIONS[0::2] if part == "stream" else SHORT_QUESTIONS[1::2]
    n_short = min(n // 3, len(facts))
    out = [_short(q, a) for q, a in rng.sample(facts, n_short)]
    seen: set[str] = set()
    while len(out) < n:
        word = len(out) % 2 == 0  # alternate the two arithmetic skills
        op = rng.choice("+-×")
        a, b, value = _operands(op, rng)
        if word:
            template, op = rng.choice([t for t in WORD_PROBLEMS[part] if t[1] == op] or [("", op)])
            if not template:
                continue
            prompt, kind = template.format(a=a, b=b), "word"
        else:
            template = rng.choice(ARITHMETIC_WORDINGS[part])
            prompt, kind = template.format(a=a, b=b, op=op, word=OP_WORDS[op]), "arithmetic"
        if prompt not in seen:
            seen.add(prompt)
            out.append(LabeledQuestion(prompt, str(value), kind))
    rng.shuffle(out)
    return out


def _operands(op: str, rng: random.Random) -> tuple[int, int, int]:
    if op == "+":
        a, b = rng.randint(*ADD_RANGE), rng.randint(*ADD_RANGE)
        return a, b, a + b
    if op == "-":
        a = rng.randint(*SUB_RANGE)
        b = rng.randint(1, a - 1)
        return a, b, a - b
    a, b = rng.randint(*MUL_RANGE), rng.randint(*MUL_RANGE)
    return a, b, a * b
