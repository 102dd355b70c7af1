"""load_examples: every source, column mapping, filters, shuffling, limits and held-out evaluation."""

from __future__ import annotations

import csv
import json

import pytest

from apo_cli.data import Example, load_examples
from apo_cli.errors import DataError
from apo_cli.recipe import DataSpec

ROWS = [
    {"q": f"problem {i}", "a": str(i * i), "level": f"Level {1 + i % 3}", "kind": "algebra" if i % 2 else "geometry"}
    for i in range(12)
]


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "json-data":
        path.write_text(json.dumps({"data": rows}))
    elif fmt == "json-columns":
        path.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _spec(path, **kw) -> DataSpec:
    base = {"source": str(path), "prompt_column": "q", "answer_column": "a", "shuffle": False}
    return DataSpec(**{**base, **kw})


@pytest.fixture
def jsonl(tmp_path):
    return _write(tmp_path / "rows.jsonl", ROWS, "jsonl")


SUFFIX = {"jsonl": "jsonl", "json": "json", "json-data": "json", "json-columns": "json", "csv": "csv", "parquet": "parquet"}


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_every_file_format_round_trips(tmp_path, fmt):
    path = _write(tmp_path / f"rows.{SUFFIX[fmt]}", ROWS, fmt)
    examples = load_examples(_spec(path, extra_columns=["level"]), seed=0, split="train")
    assert examples == [
        Example(index=i, prompt=r["q"], answer=r["a"], columns={"level": r["level"], "a": r["a"]})
        for i, r in enumerate(ROWS)
    ]


def test_missing_mapped_column_names_row_and_column(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[5]["a"]
    path = _write(tmp_path / "rows.jsonl", rows, "jsonl")
    with pytest.raises(DataError, match=r"row 5 has no column 'a' \(data.answer_column\)"):
        load_examples(_spec(path), 0, "train")
    with pytest.raises(DataError, match=r"row 0 has no column 'grade' \(data.extra_columns\)"):
        load_examples(_spec(_write(tmp_path / "ok.jsonl", ROWS, "jsonl"), extra_columns=["grade"]), 0, "train")


def test_empty_prompt_is_an_error(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[3]["q"] = None
    with pytest.raises(DataError, match=r"row 3: column 'q' \(data.prompt_column\) is empty"):
        load_examples(_spec(_write(tmp_path / "r.jsonl", rows, "jsonl")), 0, "train")


def test_no_answer_column(jsonl):
    ex = load_examples(_spec(jsonl, answer_column=None), 0, "train")
    assert ex[0].answer is None and ex[0].columns == {}


def test_filters_equal_and_in_list(jsonl):
    one = load_examples(_spec(jsonl, filters={"level": "Level 2"}), 0, "train")
    assert [e.prompt for e in one] == ["problem 1", "problem 4", "problem 7", "problem 10"]
    assert [e.index for e in one] == [0, 1, 2, 3]  # index counts rows after filtering
    two = load_examples(_spec(jsonl, filters={"level": ["Level 1", "Level 3"], "kind": "geometry"}), 0, "train")
    assert [e.prompt for e in two] == ["problem 0", "problem 2", "problem 6", "problem 8"]


def test_filters_match_csv_text(tmp_path):
    rows = [{"q": f"p{i}", "a": "1", "grade": i % 2} for i in range(6)]
    path = _write(tmp_path / "r.csv", rows, "csv")  # csv cells are text: "0" / "1"
    assert len(load_examples(_spec(path, filters={"grade": 1}), 0, "train")) == 3


def test_filter_errors(jsonl):
    with pytest.raises(DataError, match=r"row 0 has no column 'difficulty' \(used in data.filters\)"):
        load_examples(_spec(jsonl, filters={"difficulty": 3}), 0, "train")
    with pytest.raises(DataError, match=r"no row of 12 matches data.filters .*level: 'Level 1', 'Level 2', 'Level 3'"):
        load_examples(_spec(jsonl, filters={"level": "level 3"}), 0, "train")


def test_shuffle_is_deterministic_in_the_seed(jsonl):
    a = load_examples(_spec(jsonl, shuffle=True), 1, "train")
    b = load_examples(_spec(jsonl, shuffle=True), 1, "train")
    c = load_examples(_spec(jsonl, shuffle=True), 2, "train")
    assert a == b
    assert [e.index for e in a] != [e.index for e in c]
    assert sorted(e.index for e in a) == list(range(12))
    assert [e.index for e in load_examples(_spec(jsonl), 1, "train")] == list(range(12))  # shuffle off


def test_limit(jsonl):
    assert len(load_examples(_spec(jsonl, limit=5), 0, "train")) == 5
    assert len(load_examples(_spec(jsonl, limit=50), 0, "train")) == 12


def test_eval_fraction_is_disjoint_and_seed_independent(jsonl):
    spec = _spec(jsonl, eval_fraction=0.25, shuffle=True)
    train = load_examples(spec, 0, "train")
    held = load_examples(spec, 0, "eval")
    assert len(held) == 3 and len(train) == 9
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    assert {e.index for e in train} | {e.index for e in held} == set(range(12))
    # another run seed reorders training rows but holds out the same problems
    assert {e.prompt for e in load_examples(spec, 7, "eval")} == {e.prompt for e in held}
    assert {e.prompt for e in load_examples(spec, 7, "train")} == {e.prompt for e in train}
    # limits apply after the split and never leak evaluation rows into training
    limited = _spec(jsonl, eval_fraction=0.25, limit=4, eval_limit=2)
    assert len(load_examples(limited, 0, "eval")) == 2
    assert {e.prompt for e in load_examples(limited, 0, "train")}.isdisjoint({e.prompt for e in held})


def test_eval_without_configuration_is_empty(jsonl):
    assert load_examples(_spec(jsonl), 0, "eval") == []


def test_eval_split_needs_a_hub_dataset(jsonl):
    with pytest.raises(DataError, match="data.eval_split='test' needs a hub dataset"):
        load_examples(_spec(jsonl, eval_split="test"), 0, "eval")


def test_eval_fraction_needs_two_rows(tmp_path):
    path = _write(tmp_path / "one.jsonl", ROWS[:1], "jsonl")
    with pytest.raises(DataError, match="needs at least 2 rows"):
        load_examples(_spec(path, eval_fraction=0.5), 0, "train")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"q": "a", "a": "1"}\n{"q": \n', r"line 2: invalid JSON"),
        ('{"q": "a", "a": "1"}\n[1, 2]\n', r"line 2: expected a JSON object, got list"),
    ],
)
def test_bad_jsonl(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_examples(_spec(path), 0, "train")


def test_missing_file_and_task_kwargs_on_files(tmp_path, jsonl):
    with pytest.raises(DataError, match="data file not found"):
        load_examples(_spec(tmp_path / "nope.jsonl"), 0, "train")
    with pytest.raises(DataError, match="task_kwargs applies to builtin: tasks only"):
        load_examples(_spec(jsonl, task_kwargs={"size": 3}), 0, "train")


def test_hub_dataset_unavailable_offline_is_a_data_error():
    spec = DataSpec(source="apo-test-nonexistent-org/nonexistent-dataset", prompt_column="q", answer_column="a")
    with pytest.raises(DataError, match=r"cannot load dataset 'apo-test-nonexistent-org/nonexistent-dataset', split 'train'"):
        load_examples(spec, 0, "train")


def test_a_utf8_bom_csv_loads(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark, which must not become part of the first column's name."""
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffq,a\nproblem 0,0\nproblem 1,1\n".encode())
    assert [(x.prompt, x.answer) for x in load_examples(_spec(path), seed=0)] == [("problem 0", "0"), ("problem 1", "1")]


CHAT = [
    [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 1 + 1?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2?"}],
]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hub"])
def test_chat_prompts_are_conversations_not_strings(tmp_path, fmt):
    """A prompt column of {"role", "content"} lists (TRL's conversational format) from any source."""
    rows = [{"q": m, "a": str(2 * (i + 1))} for i, m in enumerate(CHAT)]
    if fmt == "hub":  # a dataset folder saved by `datasets`, read through datasets.load_dataset
        import datasets

        path = tmp_path / "chat_ds"
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "part.parquet"))
        path.mkdir()
        (tmp_path / "part.parquet").rename(path / "train.parquet")
    else:
        path = _write(tmp_path / f"chat.{fmt}", rows, fmt)
    examples = load_examples(_spec(path), seed=0)
    assert [x.prompt for x in examples] == ["What is 1 + 1?", "2 + 2?"]  # the last user message
    assert [list(x.messages) for x in examples] == CHAT
    assert all("role" not in x.prompt for x in examples)


def test_chat_prompts_from_parquet_drop_the_keys_other_messages_filled_with_null(tmp_path):
    rows = [{"q": [{"role": "user", "content": "1 + 1?", "name": "ann"}], "a": "2"},
            {"q": [{"role": "user", "content": "2 + 2?"}], "a": "4"}]
    path = _write(tmp_path / "chat.parquet", rows, "parquet")
    assert [list(x.messages) for x in load_examples(_spec(path), seed=0)] == [rows[0]["q"], rows[1]["q"]]


@pytest.mark.parametrize(("cell", "match"), [
    (42, r"row 0: column 'q' \(data.prompt_column\) holds a number \(42\), not text or a list of chat messages"),
    (1.5, r"row 0: .* holds a number \(1.5\)"),
    (False, r"row 0: .* holds a boolean \(False\)"),
    (float("nan"), r"row 0: column 'q' \(data.prompt_column\) is empty"),
    ({"role": "user", "content": "x"}, r"row 0: .*holds an object, .*a chat prompt is a list of such messages"),
    (["just", "text"], r"row 0: .*holds a list whose item 0 is a str"),
    ([{"role": "user", "content": ["a", "part"]}], r"row 0: .*message 0 \(user\): 'content' must be text \(got a list\)"),
    ([{"role": 3, "content": "x"}], r"row 0: .*message 0: 'role' must be a name"),
    ([], r"row 0: .*is empty"),
    ([{"role": "user", "content": "  "}], r"row 0: .*the last user message is empty"),
], ids=["int", "float", "bool", "nan", "dict", "list-of-str", "content-parts", "role-number", "no-messages", "blank"])
def test_prompts_that_are_neither_text_nor_messages_are_refused_naming_the_row(tmp_path, cell, match):
    path = tmp_path / "bad.parquet" if isinstance(cell, float) else tmp_path / "bad.jsonl"
    rows = [{"q": cell, "a": "1"}]
    _write(path, rows, "parquet" if path.suffix == ".parquet" else "jsonl")
    with pytest.raises(DataError, match=rf"^{path}: {match}"):
        load_examples(_spec(path), seed=0)


def test_a_nan_answer_is_empty_not_the_text_nan(tmp_path):
    path = _write(tmp_path / "nan.parquet", [{"q": "problem", "a": float("nan")}], "parquet")
    with pytest.raises(DataError, match=r"row 0: column 'a' \(data.answer_column\) is empty"):
        load_examples(_spec(path), seed=0)


def test_held_out_chat_prompts_hash_the_whole_conversation(tmp_path):
    """Two conversations ending in the same question are different problems for the held-out split."""
    rows = [{"q": [{"role": "system", "content": f"persona {i}"}, {"role": "user", "content": "same?"}], "a": "1"}
            for i in range(10)]
    path = _write(tmp_path / "chat.jsonl", rows, "jsonl")
    held = load_examples(_spec(path, eval_fraction=0.3), seed=0, split="eval")
    train = load_examples(_spec(path, eval_fraction=0.3), seed=0)
    assert len(held) == 3 and len(train) == 7
    assert not {json.dumps(x.messages) for x in held} & {json.dumps(x.messages) for x in train}
