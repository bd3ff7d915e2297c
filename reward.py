"""GSM8K for the demo: the verifier behind its reward, the prompts it asks with, generated word
problems in GSM8K's format, and the loading of --data (the hub's openai/gsm8k, or local files).

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

import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------
# The prompts the demo asks with: the format they ask for is what strict scoring accepts

SYSTEM_PROMPTS = {  # --system-prompt takes one of these names, or any text
    "demo": "Solve the math problem step by step. Give the final answer as a number in \\boxed{}, for example \\boxed{42}.",
    # the CPU recipe's (README "Does it learn?"): a 135M model's answer then fits in 48 tokens
    "brief": "Solve the math problem. Be brief: write one line of working, then the final answer as \\boxed{number}.",
    # the credit experiment's (docs/credit.md): one line per step, so that a two-step answer spans segments
    "lines": ("Solve the math problem with one equation per line, then write the final answer as \\boxed{number}.\n"
              "Example question: Tom has 2 apples, gets 3 more on Monday and 4 more on Tuesday. How many apples does "
              "Tom have now?\nExample answer:\n2 + 3 = 5\n5 + 4 = 9\n\\boxed{9}"),
}


def chat_prompt(tokenizer, question: str, system_prompt: str = "demo") -> str:
    """The question in the model's chat template, after a system message: a SYSTEM_PROMPTS name or any text."""
    messages = [{"role": "system", "content": SYSTEM_PROMPTS.get(system_prompt, system_prompt)},
                {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# Generated word problems in GSM8K's format (`--data easy`, `--data steps`), with numbers small
# enough that a 135M model solves some of them, so that RL has a signal on a CPU. Each set is fixed
# by its own seed, not a run's --seed: every run trains on the same problems and is scored on the
# same test questions.
#   easy   add, subtract, multiply, add twice (a quarter take two steps); numbers 2-9
#   steps  add, multiply, add then give away, add twice (half take two steps); numbers 2-5

PROBLEM_SETS = {"easy": (("add", "subtract", "multiply", "add twice"), 2, 9),
                "steps": (("add", "multiply", "add then give", "add twice"), 2, 5)}
NAMES = ["Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Jack", "Emma", "Omar", "Sofia", "Leo", "Mia"]
ITEMS = ["apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "shells", "stamps", "balloons"]
SIZES = {"test": 200, "train": 2000}
SEED = 2026


def word_problems(name: str, split: str, seed: int = SEED) -> list[dict]:
    """The `split` ("train": 2000, "test": 200) of the seeded problem set `name`, distinct problems:
    the first 200 are the test split, so no test question is ever trained on."""
    kinds, low, high = PROBLEM_SETS[name]
    rng, problems, seen = random.Random(seed), [], set()
    while len(problems) < SIZES["test"] + SIZES["train"]:
        problem = word_problem(rng, kinds, low, high)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
    return problems[:SIZES["test"]] if split == "test" else problems[SIZES["test"]:]


def word_problem(rng: random.Random, kinds, low: int, high: int) -> dict:
    """One problem of a random kind, {"question", "answer"} with GSM8K's `<<a+b=c>>` working and
    `#### c`; a two-step problem's first `<<...>>` is its intermediate result."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(low, high), rng.randint(low, high), rng.randint(low, high)
    kind = rng.choice(kinds)
    if kind == "add":
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        steps = [(a, "+", b)]
    elif kind == "subtract":
        question = f"{name} has {a + b} {item} and gives {b} of them away. How many {item} does {name} have left?"
        steps = [(a + b, "-", b)]
    elif kind == "multiply":
        question = f"{name} buys {a} packs of {item}. Each pack has {b} {item}. How many {item} does {name} buy?"
        steps = [(a, "*", b)]
    elif kind == "add then give":
        c = min(c, a + b - 1)  # something is left
        question = (f"{name} has {a} {item} and gets {b} more. Then {name} gives {c} away. "
                    f"How many {item} does {name} have now?")
        steps = [(a, "+", b), (a + b, "-", c)]
    else:
        question = (f"{name} has {a} {item}, gets {b} more on Monday and {c} more on Tuesday. "
                    f"How many {item} does {name} have now?")
        steps = [(a, "+", b), (a + b, "+", c)]
    working = []
    for left, operator, right in steps:
        result = {"+": left + right, "-": left - right, "*": left * right}[operator]
        working.append(f"{left} {operator} {right} = <<{left}{operator}{right}={result}>>{result}")
    return {"question": question, "answer": f"{', then '.join(working)} {item}.\n#### {result}"}


def numbers_in(text: str) -> list[str]:
    """Every number in `text`, canonical ('1,234.50' -> '1234.5')."""
    return [_canonical([number]) for number in _numbers(text.replace("\u2212", "-"))]


def intermediate_result(answer: str) -> str | None:
    """The first of several `<<expr=result>>` steps of a GSM8K answer (canonical), or None for a
    one-step answer."""
    results = re.findall(r"<<[^=<>]*=([^<>]*)>>", answer)
    return _canonical(_numbers(results[0])[:1]) if len(results) > 1 else None


# ----------------------------------------------------------------------------------------------
# Loading problems: the demo's --data

# A dozen GSM8K-style problems for --smoke, in the dataset's own format.
SMOKE_PROBLEMS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(1, 2), (2, 3), (3, 4), (4, 1), (2, 2), (1, 5), (3, 3), (0, 7), (5, 3), (6, 2), (4, 4), (1, 1)]
]


def load_problems(data: str, split: str) -> list[dict]:
    """GSM8K-format problems ({"question", "answer" ending in "#### <number>"}) of `split`
    ("train" or "test") from `data`: "smoke" (the built-in dozen), "easy" or "steps" (generated),
    local JSON Lines files, or a hub dataset. Refused in one line, naming the file and line, if the
    reward could not score them."""
    if data == "smoke":
        return list(SMOKE_PROBLEMS)  # a copy: the caller shuffles it
    if data in PROBLEM_SETS:
        return word_problems(data, split)
    import datasets
    files = local_data_files(data)
    if files:
        if not files[split].read_text().strip():  # datasets would call it "no data", obscurely
            return check_problems([], str(files[split]))
        try:  # datasets' json builder: one JSON object per line
            problems = list(datasets.load_dataset("json", data_files={split: str(files[split])}, split=split))
        except Exception as error:  # a malformed line raises deep inside datasets: name the file
            raise SystemExit(f"could not read {files[split]}: {error}")
        return check_problems(problems, str(files[split]))
    try:
        problems = list(datasets.load_dataset(data, "main", split=split))
    except Exception as error:  # the hub raises many types: connection, missing file, auth
        raise SystemExit(f"could not load the dataset {data!r} ({type(error).__name__}: {error}).\n"
                         "It downloads from the Hugging Face hub: check the network, or set HF_HUB_OFFLINE=1 "
                         "with a cached copy, or pass --data with a local folder. --smoke runs offline.")
    return check_problems(problems, f"{data} ({split})")


def local_data_files(data: str) -> dict[str, Path] | None:
    """{"train": path, "test": path} for a local folder or a "TRAIN.jsonl,TEST.jsonl" pair; None for
    a hub dataset name."""
    if "," in data:
        train, test = data.split(",", 1)
        return {"train": Path(train), "test": Path(test)}
    if Path(data).is_dir():
        return {"train": Path(data) / "train.jsonl", "test": Path(data) / "test.jsonl"}
    return None


def check_problems(problems: list[dict], source: str) -> list[dict]:
    """Refuse data the reward cannot score, naming the file and line, before any training."""
    if not problems:
        raise SystemExit(f"{source}: no problems in this split")
    for number, problem in enumerate(problems, start=1):
        where = f"{source}: {record_place(source, number)}"
        for key in ("question", "answer"):
            if not isinstance(problem.get(key), str) or not problem[key].strip():
                raise SystemExit(f"{where}: the record has no {key!r} text (GSM8K format: "
                                 '{"question": "...", "answer": "... #### 42"})')
        if "####" not in problem["answer"] or reference_answer(problem["answer"]) is None:
            raise SystemExit(f"{where}: the answer has no final '#### <number>', so no reward can be computed")
    return problems


def record_place(source: str, number: int) -> str:
    """"line K" of the file that holds its `number`-th record (blank lines hold none), or
    "record K" for a hub dataset."""
    if not Path(source).is_file():
        return f"record {number}"
    with open(source) as file:
        nonblank = (line_number for line_number, line in enumerate(file, start=1) if line.strip())
        return f"line {next(line for count, line in enumerate(nonblank, start=1) if count == number)}"
