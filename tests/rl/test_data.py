"""Real dataset loading, missing-data errors, prompts, the arithmetic task, batch resume."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from gxpo.rl import data
from gxpo.rl.data import ArithTask, BatchIterator, Example, build_prompt, load_examples

SHARED = data._repo_data_dir()


@pytest.fixture(scope="module")
def real_data():
    """The real benchmark files: ../shared/data beside the repo, else $GXPO_DATA_DIR."""
    root = data.default_data_dir()
    if root is None:
        pytest.fail(f"no real data: expected {SHARED} or ${data.DATA_DIR_ENV}")
    return root


MATH_EMPTY = {"train/number_theory/7115.json", "train/number_theory/7117.json"}
# (name, split, count from the data README, index, expected answer, kind)
REAL = [
    ("math", "train_level3to5", 5586, 0, "0", "math"),
    ("math", "train", 7500, None, None, "math"),
    ("math", "test", 5000, 0, "2", "math"),
    ("math", "math12k_level3to5", 8888, None, None, "math"),
    ("math500", "test", 500, 0, r"\left( 3, \frac{\pi}{2} \right)", "math"),
    ("amc23", "test", 40, 0, "27", "math"),
    ("gsm8k", "test", 1319, 0, "18", "numeric"),
    ("gsm8k", "train", 7473, 0, "72", "numeric"),
    ("minerva_math", "test", 272, 1, "4.5e33", "math"),
    ("olympiadbench", "test", 675, 1, r"\frac{1}{2 n+2}", "math"),
]


@pytest.mark.parametrize("name, split, count, index, answer, kind", REAL)
def test_real_datasets(real_data, name, split, count, index, answer, kind):
    examples = load_examples(name, split, real_data)
    assert len(examples) == count
    assert all(e.question and e.kind == kind for e in examples)
    # MATH's own data has two solutions ending in an empty \boxed{}.
    empty = {e.uid for e in examples if not e.answer}
    assert empty == (MATH_EMPTY if name == "math" and split != "test" else set())
    if index is not None:
        assert examples[index].answer == answer


def test_known_records(real_data):
    # is_multiple_answer: dollars stripped, one comma-separated reference
    olympiad = {e.uid: e for e in load_examples("olympiadbench", data_dir=real_data)}
    assert olympiad["1618"].answer == "(1,8,19), (2,7,13), (4,5,7)"
    assert olympiad["1664"].answer == "69,84" and olympiad["1807"].answer == "-2,0,2"
    gsm = load_examples("gsm8k", "test", real_data)
    assert gsm[1].answer == "3" and gsm[0].question.startswith("Janet")
    # the default split of math is the level 3-5 training set; its uid is MATH's unique_id
    math = load_examples("math", data_dir=real_data)
    assert len(math) == 5586 and math[0].uid == "train/algebra/0.json"
    minerva = load_examples("minerva_math", data_dir=real_data)
    assert minerva[0].answer == "1.6" and minerva[0].source == "minerva_math"


@pytest.mark.skipif(not SHARED.is_dir(), reason="checks the ../shared/data default itself")
def test_default_data_dir_is_shared_beside_repo(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)  # an explicit $GXPO_DATA_DIR wins
    assert data.default_data_dir() == SHARED
    assert len(load_examples("amc23")) == 40


def test_data_dir_precedence(monkeypatch, tmp_path):
    """The argument (config.data.data_dir), then $GXPO_DATA_DIR, then the development tree."""

    def amc23(root, question):
        (root / "amc23").mkdir(parents=True)
        record = {"id": 1, "problem": question, "answer": 2}
        (root / "amc23" / "test.jsonl").write_text(json.dumps(record) + "\n")
        return root

    dev = amc23(tmp_path / "dev", "from the development tree")
    env = amc23(tmp_path / "env", "from the environment")
    explicit = amc23(tmp_path / "explicit", "from the argument")
    monkeypatch.setattr(data, "_repo_data_dir", lambda: dev)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert load_examples("amc23")[0].question == "from the development tree"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env))
    assert load_examples("amc23")[0].question == "from the environment"
    assert load_examples("amc23", data_dir=explicit)[0].question == "from the argument"
    assert data.load_source("amc23", data_dir=explicit)[0].question == "from the argument"


def test_env_data_dir_then_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_repo_data_dir", lambda: tmp_path / "absent")
    (tmp_path / "amc23").mkdir()
    record = {"id": 7, "problem": "1+1?", "answer": 2.0, "url": "", "question": "1+1?"}
    (tmp_path / "amc23" / "test.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert load_examples("amc23") == [Example("1+1?", "2", "math", "amc23", "7")]
    # With neither, the hub is asked (offline tests: a stand-in records the request).
    monkeypatch.delenv(data.DATA_DIR_ENV)
    asked = []
    monkeypatch.setattr(data, "_load_hub", lambda name, spec, split: asked.append(name) or [])
    assert load_examples("gsm8k") == [] and asked == ["gsm8k"]


def test_missing_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_examples("math500", "test", tmp_path / "nowhere")
    message = str(e.value)
    assert "nowhere/math500/test.jsonl" in message and "does not exist" in message
    assert "<data_dir>/<name>/<split>.jsonl" in message and "olympiadbench" in message
    with pytest.raises(FileNotFoundError, match=r"gsm8k/valid\.jsonl.*splits \['test', 'train'\]"):
        load_examples("gsm8k", "valid", tmp_path)
    with pytest.raises(ValueError, match=r"unknown dataset 'mathqa'.*'minerva_math'"):
        load_examples("mathqa")
    with pytest.raises(ValueError, match="ArithTask"):
        load_examples("arith")


# --- datasets from files and the hub --------------------------------------------------------

ROWS = [
    {"problem": "What is 2 + 2?", "solution": 4, "level": 1, "tags": ["easy"]},
    {"problem": "What is 1/2 + 1/2?", "solution": 1.0, "level": 2, "tags": []},
    {"problem": "Name the third prime.", "solution": 5, "level": 3, "tags": ["primes"]},
]


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        import pandas as pd  # noqa: PLC0415

        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_file_datasets_with_custom_fields(tmp_path, suffix):
    path = _write(tmp_path / f"mine{suffix}", ROWS)
    examples = data.load_source(
        str(path), question_field="problem", answer_field="solution", kind="numeric"
    )
    assert examples == [
        Example("What is 2 + 2?", "4", "numeric", "mine", "0"),
        Example("What is 1/2 + 1/2?", "1", "numeric", "mine", "1"),  # 1.0 -> "1"
        Example("Name the third prime.", "5", "numeric", "mine", "2"),
    ]
    # Every other field travels with the example, for the reward functions.
    assert [dict(e.extra) for e in examples] == [
        {"level": r["level"], "tags": r["tags"]} for r in ROWS
    ]
    assert data.parse_source(str(path)) == data.Source("file", "mine", str(path))
    # No answers: allowed, answer None.
    unanswered = data.load_source(str(path), question_field="problem", answer_field=None)
    assert [e.answer for e in unanswered] == [None] * 3
    assert unanswered[0].extra["solution"] == 4


def test_malformed_rows_name_the_file_and_line(tmp_path):
    def error(name, text=None, rows=None, **fields):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        else:
            _write(path, rows)
        with pytest.raises(ValueError) as e:
            data.load_source(str(path), **fields)
        message = str(e.value)
        assert message.startswith(f"{path}") and "\n" not in message
        return message

    good = json.dumps({"question": "q", "answer": "1"})
    bad_json = error("a.jsonl", f"{good}\n\n{good}\n{{'question': 'q'}}\n")
    assert "a.jsonl, line 4: not valid JSON (Expecting property name" in bad_json
    missing = error("b.jsonl", f"{good}\n" + json.dumps({"problem": "q", "answer": "1"}))
    assert "b.jsonl, line 2: no field 'question' (the row has ['answer', 'problem'])" in missing
    assert "config.data.question_field" in missing
    no_answer = error("c.jsonl", good + "\n" + json.dumps({"question": "q"}) + "\n")
    assert "line 2: no field 'answer'" in no_answer and "config.data.answer_field" in no_answer
    wrong = error("d.jsonl", json.dumps({"question": "q", "answer": [1, 2]}))
    assert "line 1: field 'answer' is a list, not a string or a number" in wrong
    assert "line 1: field 'question' is null" in error(
        "e.jsonl", json.dumps({"question": None, "answer": 1})
    )
    assert "line 1: expected a JSON object, got a list" in error("f.jsonl", "[1, 2]\n")
    assert "g.json: not valid JSON (Expecting ',' delimiter at line 1" in error(
        "g.json", '[{"question": "q"} {}]'
    )
    assert "h.json: expected a JSON list of objects" in error("h.json", json.dumps({"a": 1}))
    assert "i.json, row 1: no field 'question'" in error(
        "i.json", rows=[{"question": "q", "answer": 1}, {"answer": 1}]
    )
    parquet = error("j.parquet", rows=[{"q": "x", "answer": "1"}], question_field="question")
    assert "j.parquet, row 0: no field 'question'" in parquet
    assert "k.parquet: not a readable parquet file" in error("k.parquet", "not parquet")
    clash = error("l.jsonl", json.dumps({"question": "q", "answer": 1, "completions": 2}))
    assert "field 'completions' has the name of a reward function's argument" in clash
    assert error("m.jsonl", "\n") == f"{tmp_path / 'm.jsonl'}: no rows"


def test_parse_source():
    assert data.parse_source("arith") == data.Source("arith", "arith")
    assert data.parse_source("gsm8k") == data.Source("registered", "gsm8k")
    assert data.parse_source("hf:openai/gsm8k:main@test") == data.Source(
        "hf", "gsm8k", "openai/gsm8k", "main", "test"
    )
    assert data.parse_source("hf:org/set") == data.Source("hf", "set", "org/set", None, None)
    with pytest.raises(ValueError, match=r"no such file \(.*/nowhere/x\.jsonl\)"):
        data.parse_source("nowhere/x.jsonl")
    with pytest.raises(ValueError, match=r"not a dataset: .*'gsm8k'.*\.jsonl/\.json/\.parquet"):
        data.parse_source("data.csv")
    with pytest.raises(ValueError, match="hf:<dataset id>"):
        data.parse_source("hf:")


def test_hub_datasets(monkeypatch):
    # Offline (as every test is): one clear line, no traceback from deep inside `datasets`.
    with pytest.raises(OSError) as e:
        data.load_source("hf:no-org/no-such-set")
    message = str(e.value)
    assert "hub dataset no-org/no-such-set" in message and "split 'train'" in message
    assert "save it as a .jsonl or .parquet file" in message and "\n" not in message
    # Online: the rows go through the same fields as a file's (a stand-in for the hub).
    asked = []

    def hub_rows(dataset_id, config, split):
        asked.append((dataset_id, config, split))
        return [{"prompt_text": "q", "target": 3, "source": "x"}]

    monkeypatch.setattr(data, "_hub_rows", hub_rows)
    fields = dict(question_field="prompt_text", answer_field="target")
    (example,) = data.load_source("hf:org/set:cfg", for_eval=True, **fields)
    assert example == Example("q", "3", "math", "set", "0") and example.extra == {"source": "x"}
    data.load_source("hf:org/set@validation", **fields)
    assert asked == [("org/set", "cfg", "test"), ("org/set", None, "validation")]


# --- prompts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<pad>", "<eos>", "What", "is", "3", "+", "5?", "Answer", "with", "just", "the"]
    vocab = {w: i for i, w in enumerate(words + ["number.", "<|user|>", "<|assistant|>", "[UNK]"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def test_build_prompt(tokenizer):
    arith = ArithTask().train_example(0)
    assert build_prompt(arith) == f"{arith.question} Answer with just the number."
    math = Example("Find x.", "1", "math", "math500")
    plain = build_prompt(math, tokenizer, chat=False)
    assert (
        plain == "Find x.\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    chat = build_prompt(math, tokenizer, system_prompt="Be brief.")
    assert chat == f"<|system|> Be brief. <|user|> {plain} <|assistant|>"
    custom = build_prompt(
        math, tokenizer, template="Q: {question} Put it in \\boxed{}.", chat=False
    )
    assert custom == "Q: Find x. Put it in \\boxed{}."
    with pytest.raises(ValueError, match=r"\{question\}"):
        build_prompt(math, template="no placeholder")
    no_template = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="chat=False"):
        build_prompt(math, no_template)


def test_encode_prompts(tokenizer):
    texts = ["What is 3 + 5?", "What is 3 + 5? Answer with just the number."]
    tokens_BxP, mask_BxP = data.encode_prompts(texts, tokenizer, pad_multiple=8)
    assert tokens_BxP.shape == mask_BxP.shape == (2, 16) and tokens_BxP.dtype == np.int32
    assert mask_BxP.sum(axis=1).tolist() == [5, 10]
    assert mask_BxP[0, -5:].all() and not mask_BxP[0, :-5].any()  # left padding
    assert (tokens_BxP[mask_BxP == 0] == tokenizer.pad_token_id).all()
    assert tokens_BxP[0, -5:].tolist() == tokenizer("What is 3 + 5?")["input_ids"]
    with pytest.raises(ValueError, match="max_length=5"):
        data.encode_prompts(texts, tokenizer, max_length=5)


# --- the arithmetic task ---------------------------------------------------------------------


def test_arith_answers_and_config():
    task = ArithTask(num_operands=3, operators="+-*", min_digits=1, max_digits=2, seed=3)
    for e in task.eval_examples() + [task.train_example(i) for i in range(50)]:
        expression = e.question.removeprefix("What is ").removesuffix("?")
        assert int(e.answer) == eval(expression)  # Python's precedence agrees
        assert e.kind == "numeric" and e.source == "arith"
    digits = {len(t) for i in range(200) for t in task.train_example(i).question[8:-1].split()[::2]}
    assert digits == {1, 2}
    with pytest.raises(ValueError, match="operators"):
        ArithTask(operators="/")
    with pytest.raises(ValueError, match="eval_size"):
        ArithTask(eval_size=51)  # 1-digit a + b: 100 problems, at most half held out
    with pytest.raises(ValueError, match="num_operands"):
        ArithTask(num_operands=1)


def test_arith_determinism_and_disjoint_eval():
    task = ArithTask(eval_size=50)
    again = ArithTask(eval_size=50)
    assert task.eval_examples() == again.eval_examples()
    assert [task.train_example(i) for i in range(300)] == [
        again.train_example(i) for i in range(300)
    ]
    eval_questions = {e.question for e in task.eval_examples()}
    assert len(eval_questions) == 50
    train_questions = {task.train_example(i).question for i in range(2000)}
    assert not train_questions & eval_questions
    assert len(train_questions) == 50  # the rest of the 100 problems, all reached
    other = ArithTask(eval_size=50, seed=1)
    assert {e.question for e in other.eval_examples()} != eval_questions


# --- batches -------------------------------------------------------------------------------


def _uids(batches):
    return [[e.uid for e in b] for b in batches]


@pytest.mark.parametrize("source", ["list", "arith"])
def test_batch_iterator_resume(source):
    examples = (
        [Example(f"q{i}", str(i), "numeric", "toy", str(i)) for i in range(10)]
        if source == "list"
        else ArithTask()
    )
    it = BatchIterator(examples, 4, seed=5)
    full = _uids(next(it) for _ in range(8))
    it = BatchIterator(examples, 4, seed=5)
    head = _uids(next(it) for _ in range(3))
    state = it.state()
    assert state == {"position": 12} and all(type(v) is int for v in state.values())
    resumed = BatchIterator(examples, 4, seed=5)
    resumed.restore(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert head + _uids(next(resumed) for _ in range(5)) == full
    if source == "list":
        # each epoch is a permutation, a different one per epoch
        flat = [u for b in full for u in b]
        assert sorted(flat[:10]) == sorted(flat[10:20]) == sorted(map(str, range(10)))
        assert flat[:10] != flat[10:20] and it.epoch == 1
        other_seed = BatchIterator(examples, 4, seed=6)
        assert _uids([next(other_seed)]) != full[:1]


def test_batch_iterator_errors():
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(ArithTask(), 0)
    with pytest.raises(ValueError, match="non-empty"):
        BatchIterator([], 2)
