"""Datasets, prompts, the generated arithmetic task, and a resumable batch iterator.

Every dataset becomes a list of ``Example``s of one shape, whatever its file looks like. A
dataset is named by (``parse_source``):

- a registered name (``DATASETS``): JSON Lines at ``<data_dir>/<name>/<split>.jsonl``, with that
  dataset's own field names; ``data_dir`` is, in order, the argument, ``$GXPO_DATA_DIR``, a
  development tree's data directory beside the repository checkout (if present), or else the
  Hugging Face hub through ``datasets`` (online machines only);
- a path to a ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file, whose question and
  answer fields are named by the caller (``config.data.question_field`` / ``answer_field``);
- ``hf:<dataset id>[:<config>][@<split>]``: a Hugging Face hub dataset (online machines only),
  with the same field names as a file.

The fields of a row other than its question and answer travel with the ``Example``
(``Example.extra``) to the reward functions.

Shapes: the key in ``gxpo.models.config`` (B prompts of a batch, P prompt tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gxpo.rl.answers import extract_boxed

DATA_DIR_ENV = "GXPO_DATA_DIR"
MATH_TEMPLATE = (
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
)
ARITH_TEMPLATE = "{question} Answer with just the number."


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: what the model is asked and what the reward checks against."""

    question: str  # problem text, before any prompt template
    answer: str | None  # reference answer, already extracted ("\\frac{1}{2}", "18"); None: none
    kind: str  # reward kind, one of gxpo.rl.rewards.KINDS
    source: str = ""  # dataset name
    uid: str = ""  # id within the dataset
    # The row's other fields, for the reward functions (not compared: two Examples are equal
    # when they ask the same thing with the same answer).
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Real datasets.


def _math_record(r: Mapping[str, Any]) -> tuple[str, str]:
    answer = r.get("answer") or extract_boxed(r["solution"]) or ""
    return r["problem"], str(answer)


def _amc_record(r: Mapping[str, Any]) -> tuple[str, str]:
    answer = r["answer"]
    if isinstance(answer, float) and answer.is_integer():  # stored as 27.0
        answer = int(answer)
    return r.get("problem") or r["question"], str(answer)


def _gsm8k_record(r: Mapping[str, Any]) -> tuple[str, str]:
    return r["question"], r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")


def _minerva_record(r: Mapping[str, Any]) -> tuple[str, str]:
    answer = extract_boxed(r["solution"]) if "solution" in r else r["answer"]
    return r.get("problem") or r["question"], str(answer)


_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _olympiad_record(r: Mapping[str, Any]) -> tuple[str, str]:
    question = r["question"] if not r.get("context") else f"{r['context']}\n{r['question']}"
    answers = [_DOLLAR_RE.sub("", a).strip() for a in r["final_answer"]]
    return question, ", ".join(answers)


@dataclasses.dataclass(frozen=True)
class _Spec:
    convert: Callable[[Mapping[str, Any]], tuple[str, str]]  # record -> (question, answer)
    kind: str
    splits: tuple[str, ...]  # first is the default
    hub_id: str
    hub_config: str | None = None
    hub_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)  # ours -> hub's


_MATH_LEVELS_3TO5 = ("Level 3", "Level 4", "Level 5")
DATASETS: dict[str, _Spec] = {
    "math": _Spec(
        _math_record,
        "math",
        ("train_level3to5", "train", "test", "math12k_level3to5"),
        "DigitalLearningGmbH/MATH-lighteval",
        hub_splits={"train_level3to5": "train"},
    ),
    "math500": _Spec(_math_record, "math", ("test",), "HuggingFaceH4/MATH-500"),
    "amc23": _Spec(_amc_record, "math", ("test",), "math-ai/amc23"),
    "gsm8k": _Spec(_gsm8k_record, "numeric", ("test", "train"), "openai/gsm8k", "main"),
    "minerva_math": _Spec(_minerva_record, "math", ("test",), "math-ai/minervamath"),
    "olympiadbench": _Spec(
        _olympiad_record,
        "math",
        ("test",),
        "Hothan/OlympiadBench",
        "OE_TO_maths_en_COMP",
        hub_splits={"test": "train"},
    ),
}
_LAYOUT = "<data_dir>/<name>/<split>.jsonl"


def _repo_data_dir() -> Path:
    """A development tree's data directory, beside the repository checkout (not in a clone)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_data_dir() -> Path | None:
    """Where registered datasets are read when no directory is given: ``$GXPO_DATA_DIR`` if
    set, else a development tree's data directory beside the repository checkout if present,
    else None (meaning: the hub)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return _repo_data_dir() if _repo_data_dir().is_dir() else None


def _spec(name: str) -> _Spec:
    if name not in DATASETS:
        hint = " (the arithmetic task is generated: use ArithTask)" if name == "arith" else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in _file_records(path)]


def _load_hub(name: str, spec: _Spec, split: str) -> list[dict[str, Any]]:
    hub_split = spec.hub_splits.get(split, split)
    try:
        rows = _hub_rows(spec.hub_id, spec.hub_config, hub_split)
    except OSError as e:
        raise FileNotFoundError(
            f"no local data for {name}/{split} (looked in data_dir, ${DATA_DIR_ENV} and a "
            f"development tree's data directory beside the repository; expected layout "
            f"{_LAYOUT}) and {e}"
        ) from e
    if split == "train_level3to5":
        rows = [r for r in rows if r.get("level") in _MATH_LEVELS_3TO5]
    return rows


def _hub_rows(dataset_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets

        return list(datasets.load_dataset(dataset_id, config, split=split))
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise OSError(
            f"the hub dataset {dataset_id} (config {config!r}, split {split!r}) could not be "
            f"loaded ({reason}); on an offline machine, save it as a .jsonl or .parquet file and "
            "give that file's path"
        ) from None


def _extra(record: Mapping[str, Any], used: Sequence[str]) -> dict[str, Any]:
    """The record's fields for the reward functions: all but ``used`` and their arguments'
    names."""
    return {k: v for k, v in record.items() if k not in used and k not in REWARD_ARGUMENTS}


def load_examples(
    name: str, split: str | None = None, data_dir: str | os.PathLike | None = None
) -> list[Example]:
    """The examples of dataset ``name`` (see ``DATASETS``), split default: its first one.

    Reads ``<data_dir>/<name>/<split>.jsonl``; with ``data_dir`` None, from
    ``default_data_dir()``, or the hub when that is None too.
    """
    spec = _spec(name)
    split = split or spec.splits[0]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None:
        records = _load_hub(name, spec, split)
    else:
        path = root / name / f"{split}.jsonl"
        if not path.is_file():
            where = "" if root.is_dir() else f" (the data directory {root} does not exist)"
            raise FileNotFoundError(
                f"dataset file {path} not found{where}; expected layout {_LAYOUT} with splits "
                f"{list(spec.splits)} for {name!r}; known datasets: {sorted(DATASETS)}"
            )
        records = _read_jsonl(path)
    examples = []
    for i, record in enumerate(records):
        question, answer = spec.convert(record)
        uid = record.get("unique_id", record.get("id", record.get("idx", i)))
        extra = _extra(record, ())
        examples.append(Example(question, answer, spec.kind, name, str(uid), extra))
    return examples


# ---------------------------------------------------------------------------------------------
# Datasets from files and the hub.

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HF_PREFIX = "hf:"
# A user's reward function takes these as arguments: no dataset field may pass under them.
REWARD_ARGUMENTS = ("prompts", "completions", "answers")


@dataclasses.dataclass(frozen=True)
class Source:
    """What a dataset entry names (``parse_source``)."""

    kind: str  # "arith" | "registered" | "file" | "hf"
    name: str  # logged as: the dataset name, the file's stem, the hub id's last part
    location: str = ""  # the file's path; the hub id
    hub_config: str | None = None
    hub_split: str | None = None  # None: "train" for training, "test" for evaluation


def parse_source(entry: str) -> Source:
    """Which dataset ``entry`` names: ``"arith"``, a registered name (``DATASETS``), a path to a
    ``.jsonl`` / ``.json`` / ``.parquet`` file, or ``"hf:<dataset id>[:<config>][@<split>]"``.

    Raises:
      ValueError: none of these (a file that does not exist, another suffix, an empty hub id).
    """
    if entry == "arith":
        return Source("arith", "arith")
    if entry in DATASETS:
        return Source("registered", entry)
    if entry.startswith(HF_PREFIX):
        rest, _, split = entry[len(HF_PREFIX) :].partition("@")
        dataset_id, _, config = rest.partition(":")
        if not dataset_id.strip("/") or "@" in split:
            raise ValueError(f"write a hub dataset as {HF_PREFIX}<dataset id>[:<config>][@<split>]")
        name = dataset_id.rstrip("/").rpartition("/")[2]
        return Source("hf", name, dataset_id, config or None, split or None)
    path = Path(os.path.expanduser(entry))
    if path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"no such file ({path.resolve()})")
        return Source("file", path.stem, str(path))
    raise ValueError(
        "not a dataset: give 'arith', a registered name "
        f"{tuple(DATASETS)}, a path to a {'/'.join(FILE_SUFFIXES)} file, or "
        f"{HF_PREFIX}<dataset id>"
    )


def load_source(
    entry: str,
    *,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    question_field: str = "question",
    answer_field: str | None = "answer",
    kind: str = "math",
    for_eval: bool = False,
) -> list[Example]:
    """The examples of a registered dataset, a file or a hub dataset (see ``parse_source``).

    Args:
      entry: what names the dataset; ``"arith"`` raises (build an ``ArithTask``).
      split: a registered dataset's split (default: its first). A hub dataset's split is
        its entry's ``@<split>``, else "train" (or "test" ``for_eval``); a file has none.
      data_dir: the directory of registered datasets (default: ``default_data_dir()``).
      question_field: the field holding the question, in a file or hub dataset's rows.
      answer_field: the field holding the reference answer; None or "": no answers (``answer``
        is None). Registered datasets keep their own fields.
      kind: how the answers of a file or hub dataset compare, one of ``KINDS`` of
        ``gxpo.rl.rewards``.
      for_eval: the entry is an evaluation benchmark (the hub split default).

    Raises:
      ValueError: an unknown entry, or a malformed row: one line naming the file, the line
        (``.jsonl``) or row (``.json``, ``.parquet``, hub) and what is wrong.
      FileNotFoundError / OSError: a missing file; a hub dataset that cannot be loaded.
    """
    source = parse_source(entry)
    if source.kind == "arith":
        return load_examples("arith")  # raises, pointing to ArithTask
    if source.kind == "registered":
        return load_examples(entry, split, data_dir)
    if source.kind == "file":
        where, records = source.location, _file_records(Path(source.location))
    else:
        hub_split = source.hub_split or ("test" if for_eval else "train")
        rows = _hub_rows(source.location, source.hub_config, hub_split)
        where, records = entry, ((f"row {i}", r) for i, r in enumerate(rows))
    examples = []
    for i, (at, record) in enumerate(records):
        examples.append(
            _file_example(record, f"{where}, {at}", i, question_field, answer_field, kind, source)
        )
    if not examples:
        raise ValueError(f"{where}: no rows")
    return examples


def _file_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) of each row: "line N" in a .jsonl (1-based), "row i" otherwise."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid and kin
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        yield from ((f"row {i}", r) for i, r in enumerate(rows))
        return
    with path.open(encoding="utf-8") as f:
        if suffix == ".json":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
                ) from None
            if not isinstance(rows, list):
                raise ValueError(
                    f"{path}: expected a JSON list of objects (one per row), got a "
                    f"{type(rows).__name__}"
                )
            for i, row in enumerate(rows):
                yield f"row {i}", _object(row, path, f"row {i}")
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            yield f"line {n}", _object(row, path, f"line {n}")


def _object(row: Any, path: Path, at: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{path}, {at}: expected a JSON object, got {_type(row)}")
    return row


def _type(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _file_example(
    record: Mapping[str, Any],
    where: str,
    index: int,
    question_field: str,
    answer_field: str | None,
    kind: str,
    source: Source,
) -> Example:
    fields = sorted(record)
    if question_field not in record:
        raise ValueError(
            f"{where}: no field {question_field!r} (the row has {fields}); name the question's "
            "field with config.data.question_field"
        )
    question = record[question_field]
    if not isinstance(question, str):
        raise ValueError(f"{where}: field {question_field!r} is {_type(question)}, not a string")
    answer = None
    if answer_field:
        if answer_field not in record:
            raise ValueError(
                f"{where}: no field {answer_field!r} (the row has {fields}); name the answer's "
                "field with config.data.answer_field ('' for data without answers)"
            )
        answer = record[answer_field]
        if isinstance(answer, float) and answer.is_integer():  # 27.0 -> "27"
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(
                f"{where}: field {answer_field!r} is {_type(answer)}, not a string or a number"
            )
        answer = str(answer)
    used = (question_field, answer_field or "")
    if clash := [k for k in REWARD_ARGUMENTS if k in record and k not in used]:
        raise ValueError(
            f"{where}: field {clash[0]!r} has the name of a reward function's argument "
            f"{REWARD_ARGUMENTS}; rename it in the data"
        )
    uid = record.get("unique_id", record.get("id", index))
    return Example(question, answer, kind, source.name, str(uid), _extra(record, used))


# ---------------------------------------------------------------------------------------------
# The arithmetic task.

_OPERATORS = "+-*"


@dataclasses.dataclass(frozen=True)
class ArithTask:
    """Generated integer arithmetic ("What is 3 + 5?") for CPU runs, scored numerically.

    Training problem i depends only on (seed, i), so a resumed run sees the same stream.
    The eval split is a fixed set of ``eval_size`` distinct problems drawn by seed, and no
    training problem is ever one of them.
    """

    num_operands: int = 2
    operators: str = "+"  # drawn uniformly from these characters, a subset of "+-*"
    min_digits: int = 1  # digits per operand, uniform in [min_digits, max_digits]; 1 digit: 0-9
    max_digits: int = 1
    eval_size: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.num_operands < 2:
            raise ValueError(f"ArithTask.num_operands must be >= 2, got {self.num_operands}")
        if not self.operators or set(self.operators) - set(_OPERATORS):
            raise ValueError(
                f"ArithTask.operators must be non-empty characters of {_OPERATORS!r}, "
                f"got {self.operators!r}"
            )
        if not 1 <= self.min_digits <= self.max_digits <= 18:
            raise ValueError(
                "ArithTask needs 1 <= min_digits <= max_digits <= 18, got "
                f"min_digits={self.min_digits}, max_digits={self.max_digits}"
            )
        if not 1 <= self.eval_size <= self.num_problems // 2:
            raise ValueError(
                f"ArithTask.eval_size must be in [1, {self.num_problems // 2}] (half of the "
                f"{self.num_problems} distinct problems), got {self.eval_size}"
            )

    @property
    def num_problems(self) -> int:
        """Distinct expressions this configuration can produce."""
        operands = 10**self.max_digits - (10 ** (self.min_digits - 1) if self.min_digits > 1 else 0)
        num_ops = len(set(self.operators))
        return operands**self.num_operands * num_ops ** (self.num_operands - 1)

    def _draw(self, rng: np.random.Generator) -> str:
        parts = []
        for j in range(self.num_operands):
            if j:
                parts.append(self.operators[rng.integers(len(self.operators))])
            digits = int(rng.integers(self.min_digits, self.max_digits + 1))
            low = 0 if digits == 1 else 10 ** (digits - 1)
            parts.append(str(int(rng.integers(low, 10**digits))))
        return " ".join(parts)

    def _example(self, expression: str, uid: str) -> Example:
        return Example(
            f"What is {expression}?", str(_evaluate(expression)), "numeric", "arith", uid
        )

    @functools.cached_property
    def _eval_expressions(self) -> tuple[str, ...]:
        rng = np.random.default_rng([self.seed, 1])
        chosen: dict[str, None] = {}
        while len(chosen) < self.eval_size:
            chosen[self._draw(rng)] = None
        return tuple(chosen)

    @functools.cached_property
    def _eval_set(self) -> frozenset[str]:
        return frozenset(self._eval_expressions)

    def eval_examples(self) -> list[Example]:
        """The held-out split, the same for every run with this seed and configuration."""
        return [self._example(e, f"eval/{i}") for i, e in enumerate(self._eval_expressions)]

    def train_example(self, index: int) -> Example:
        """Training problem number ``index`` (redrawn while it is an eval problem)."""
        for attempt in range(1_000):
            expression = self._draw(np.random.default_rng([self.seed, 0, index, attempt]))
            if expression not in self._eval_set:
                return self._example(expression, f"train/{index}")
        raise RuntimeError("unreachable: eval_size is at most half of the problem space")


def _evaluate(expression: str) -> int:
    """Value of "a op b op c ..." with * before + and -, no eval()."""
    tokens = expression.split()
    terms = [int(tokens[0])]  # signed summands, each a finished product
    for op, value in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            terms[-1] *= int(value)
        else:
            terms.append(int(value) if op == "+" else -int(value))
    return sum(terms)


# ---------------------------------------------------------------------------------------------
# Batches.


class BatchIterator:
    """Endless batches of ``batch_size`` examples, deterministic in (seed, position).

    Over a list: a fresh permutation per epoch, seeded by (seed, epoch); batches run on
    across epoch ends. Over an ``ArithTask``: its training stream. ``state()`` is plain
    ints; ``restore(state)`` resumes the exact same order.
    """

    def __init__(
        self,
        source: Sequence[Example] | ArithTask,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(source, ArithTask) and len(source) == 0:
            raise ValueError("BatchIterator needs a non-empty dataset")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0  # examples handed out so far

    def _order(self, epoch: int) -> np.ndarray:
        return _permutation(len(self.source), self.seed, epoch, self.shuffle)

    def _get(self, position: int) -> Example:
        if isinstance(self.source, ArithTask):
            return self.source.train_example(position)
        epoch, offset = divmod(position, len(self.source))
        return self.source[int(self._order(epoch)[offset])]

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        batch = [self._get(p) for p in range(self.position, self.position + self.batch_size)]
        self.position += self.batch_size
        return batch

    @property
    def epoch(self) -> int:
        return 0 if isinstance(self.source, ArithTask) else self.position // len(self.source)

    def state(self) -> dict[str, int]:
        return {"position": self.position}

    def restore(self, state: Mapping[str, int]) -> None:
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"state['position'] must be >= 0, got {position}")
        self.position = position


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


# ---------------------------------------------------------------------------------------------
# Prompts.


def default_template(example: Example) -> str:
    return ARITH_TEMPLATE if example.source == "arith" else MATH_TEMPLATE


def build_prompt(
    example: Example,
    tokenizer: Any = None,
    template: str | None = None,
    *,
    chat: bool = True,
    system_prompt: str | None = None,
) -> str:
    """The prompt text for ``example``.

    ``template`` holds ``{question}`` (other braces are literal, so ``\\boxed{}`` needs no
    escaping); default ``MATH_TEMPLATE``, or ``ARITH_TEMPLATE`` for the arithmetic task.
    With a tokenizer and ``chat=True`` the text becomes one user turn (after an optional
    system turn) of the tokenizer's chat template, ending in the assistant's turn opener.
    """
    template = default_template(example) if template is None else template
    if "{question}" not in template:
        raise ValueError(f"prompt template must contain '{{question}}', got {template!r}")
    text = template.replace("{question}", example.question)
    if tokenizer is None or not chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat=False for a plain prompt "
            "(the data config's template is then the whole prompt)"
        )
    messages = [{"role": "user", "content": text}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    pad_multiple: int = 16,
    add_special_tokens: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids and mask, (tokens_BxP, mask_BxP) int32.

    P is the longest prompt rounded up to ``pad_multiple`` (fewer distinct shapes, fewer
    compilations). Chat-templated text already holds its special tokens, hence
    ``add_special_tokens=False`` by default.
    """
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    longest = max(len(x) for x in ids)
    if max_length is not None and longest > max_length:
        raise ValueError(
            f"a prompt has {longest} tokens, over max_length={max_length}; raise the "
            "rollout's max prompt length or shorten the template"
        )
    width = -(-longest // pad_multiple) * pad_multiple
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    tokens_BxP = np.full((len(ids), width), pad_id, dtype=np.int32)
    mask_BxP = np.zeros((len(ids), width), dtype=np.int32)
    for b, x in enumerate(ids):
        if x:
            tokens_BxP[b, width - len(x) :] = x
            mask_BxP[b, width - len(x) :] = 1
    return tokens_BxP, mask_BxP
