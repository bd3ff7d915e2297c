"""GSM8K answer extraction and checking: the verifier behind the demo's reward.

Which number in a completion is its answer, first rule that matches wins:
    1. the last `\\boxed{...}`               -> the last number inside it
    2. the last `#### ...`                  -> the first number after it
    --- strict extraction stops here: only the formats the prompt asks for count ---
    3. the last "answer is ..." / "answer: ..." -> the first number after it
    4. the last number anywhere in the text  (lenient extraction only)
Numbers are compared by value: `1,234.50` == `1234.5`, `42.0` == `42`, `-7` == `−7`; `$`, `%`,
units and trailing punctuation are ignored. No number -> None (reward 0.0), never an exception.
Every pattern is linear-time: no nested quantifiers that could backtrack on long garbage.

    >>> extract_answer("so 6 * 7 = 42 apples.\\n#### 42")
    '42'
    >>> gsm8k_reward("The answer is $1,234.50.", "1234.5")
    1.0
"""

import re
from decimal import Decimal, InvalidOperation

NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"  # 1,234.50 | -7 | 42 | .5 ; commas are dropped later
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")  # one level of inner braces: \boxed{\text{18}}
HASHES = re.compile(r"####([^\n]*)")
ANSWER_IS = re.compile(r"answer(?: is|:)([^\n]*)", re.IGNORECASE)
NUMBER_RE = re.compile(NUMBER)


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer in `text` as a canonical number string ('1234.5', '-7'), or None.

    strict=True accepts only `\\boxed{}` and `####` (the formats the prompt asks for); the default
    also reads "the answer is ..." and, failing all else, the last number in the text.
    """
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    boxed = BOXED.findall(text)
    if boxed:
        return _canonical(_numbers(boxed[-1])[-1:])
    hashes = HASHES.findall(text)
    if hashes:
        return _canonical(_numbers(hashes[-1])[:1])
    if strict:
        return None
    answer_is = ANSWER_IS.findall(text)
    if answer_is and _numbers(answer_is[-1]):
        return _canonical(_numbers(answer_is[-1])[:1])
    return _canonical(_numbers(text)[-1:])


def reference_answer(answer: str) -> str | None:
    """GSM8K's reference: the number after `####` in the dataset's `answer` field, or the whole
    string when it is just the number."""
    return _canonical(_numbers(answer.split("####")[-1])[:1])


def gsm8k_reward(completion: str, answer: str, strict: bool = False) -> float:
    """1.0 when the completion's final answer equals the reference by value, else 0.0."""
    predicted, expected = extract_answer(completion, strict=strict), reference_answer(answer)
    return float(predicted is not None and predicted == expected)


def _numbers(text: str) -> list[str]:
    return NUMBER_RE.findall(text)


def _canonical(numbers: list[str]) -> str | None:
    """'1,234.50' -> '1234.5', '42.0' -> '42', '-0' -> '0'; None for an empty list or a bad number."""
    if not numbers:
        return None
    try:
        value = Decimal(numbers[0].replace(",", ""))
    except InvalidOperation:
        return None
    value = value.normalize() + 0  # + 0 turns -0 into 0
    return format(value, "f")
