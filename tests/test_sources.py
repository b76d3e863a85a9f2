"""sources.py: every format from every kind of file becomes the same examples, and a bad row is
reported through the real CLI with its file and line, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import csv
import json
import random

import pytest
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.errors import UserError
from qlora_cli.recipe.sections import DataSource
from qlora_cli.data.sources import apply_weight, read_source

SYSTEM_CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
ROWS = {
    "text": [{"text": "<s>[INST] Hi [/INST] Hello</s>"}, {"text": "<s>[INST] 2+2? [/INST] 4</s>"}],
    "alpaca": [{"instruction": "Translate", "input": "chat", "output": "cat"},
               {"instruction": "Say hi", "input": "", "output": "hi"}],
    "chat": [{"messages": SYSTEM_CHAT}, {"messages": SYSTEM_CHAT[1:3]}],
    "completion": [{"prompt": "Once upon", "completion": "a time"}, {"prompt": "1, 2,", "completion": "3"}],
}


def read(path, format: str, **options) -> list:
    return read_source(DataSource(path=str(path), format=format, **options))


# ---------------------------------------------------------------- formats


def test_text_format_keeps_the_text_and_its_file_and_line(write_jsonl):
    path = write_jsonl(ROWS["text"])
    examples = read(path, "text")
    assert [e.text for e in examples] == [r["text"] for r in ROWS["text"]]
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:2"]
    assert all(e.messages is None for e in examples)


def test_alpaca_format_joins_instruction_and_input_as_the_user_turn(write_jsonl):
    examples = read(write_jsonl(ROWS["alpaca"]), "alpaca")
    assert examples[0].messages == [{"role": "user", "content": "Translate\n\nchat"},
                                    {"role": "assistant", "content": "cat"}]
    assert examples[1].messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_alpaca_input_is_optional(write_jsonl):
    examples = read(write_jsonl([{"instruction": "Say hi", "output": "hi"}]), "alpaca")
    assert examples[0].messages[0] == {"role": "user", "content": "Say hi"}


def test_chat_format_keeps_multi_turn_conversations_with_a_system_prompt(write_jsonl):
    examples = read(write_jsonl(ROWS["chat"]), "chat")
    assert examples[0].messages == SYSTEM_CHAT
    assert examples[1].messages == SYSTEM_CHAT[1:3]


def test_completion_format_is_a_user_then_assistant_turn(write_jsonl):
    examples = read(write_jsonl(ROWS["completion"]), "completion")
    assert examples[0].messages == [{"role": "user", "content": "Once upon"},
                                    {"role": "assistant", "content": "a time"}]


def test_columns_map_our_field_names_to_the_files_own(write_jsonl):
    rows = [{"question": "Capital of France?", "answer": "Paris."}]
    examples = read(write_jsonl(rows), "completion", columns={"prompt": "question", "completion": "answer"})
    assert examples[0].messages == [{"role": "user", "content": "Capital of France?"},
                                    {"role": "assistant", "content": "Paris."}]


# ---------------------------------------------------------------- file kinds


def _as_messages(examples) -> list:
    return [(e.text, e.messages) for e in examples]


def test_jsonl_strings_may_hold_unicode_line_separators_and_lines_keep_their_numbers(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw: JSON Lines only ends at "\n".
    path = tmp_path / "separators.jsonl"
    rows = [{"prompt": f"first{mark}second", "completion": "ok"} for mark in ("\u2028", "\u2029", "\u0085")]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    examples = read(path, "completion")
    assert [e.messages[0]["content"] for e in examples] == [row["prompt"] for row in rows]
    assert [e.where for e in examples] == [f"{path}:{n}" for n in (1, 2, 3)]


@pytest.mark.parametrize("format", ["text", "chat", "alpaca", "completion"])
def test_json_parquet_and_saved_dataset_give_the_same_examples_as_jsonl(format, tmp_path, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = ROWS[format]
    expected = _as_messages(read(write_jsonl(rows), format))
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved_dict"))

    for name in ("list.json", "wrapped.json", "rows.parquet", "saved"):
        examples = read(tmp_path / name, format)
        assert _as_messages(examples) == expected, name
        assert examples[1].where == f"{tmp_path / name}:row 2"
    assert _as_messages(read(tmp_path / "saved_dict", format, split="test")) == expected


def test_csv_rows_are_read_with_their_line_numbers(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ROWS["alpaca"])
    examples = read(path, "alpaca")
    assert _as_messages(examples) == [(None, e.messages) for e in read_alpaca_jsonl(tmp_path)]
    assert [e.where for e in examples] == [f"{path}:2", f"{path}:3"]


def read_alpaca_jsonl(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS["alpaca"]))
    return read(path, "alpaca")


@pytest.mark.parametrize("name, body", [("bom.csv", "prompt,completion\nhi,there\n"),
                                        ("bom.jsonl", '{"prompt": "hi", "completion": "there"}\n')])
def test_a_utf8_bom_is_not_part_of_the_first_field(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())  # as Excel and Windows tools write UTF-8
    (example,) = read(path, "completion")
    assert example.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]


def test_saved_dataset_without_the_split_names_the_splits_it_has(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"test": Dataset.from_list(ROWS["text"])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match="no split `train` \\(it has test\\)"):
        read(tmp_path / "saved", "text")


# ---------------------------------------------------------------- limit and weight


def _numbered(write_jsonl, count: int):
    return write_jsonl([{"text": f"<s>[INST] q{i} [/INST] a{i}</s>"} for i in range(count)])


def test_limit_keeps_the_first_rows(write_jsonl):
    examples = read(_numbered(write_jsonl, 10), "text", limit=3)
    assert [e.text for e in examples] == [f"<s>[INST] q{i} [/INST] a{i}</s>" for i in range(3)]


@pytest.mark.parametrize("weight, count", [(0.5, 5), (1.0, 10), (2.0, 20), (1.5, 15)])
def test_weight_scales_how_many_examples_a_source_contributes(write_jsonl, weight, count):
    examples = apply_weight(read(_numbered(write_jsonl, 10), "text"), weight, random.Random(0))
    texts = [e.text for e in examples]
    assert len(texts) == count
    whole = int(weight)
    assert all(texts.count(t) >= whole for t in set(texts)), "every example repeats at least int(weight) times"
    assert len(set(texts)) == (10 if weight >= 1 else 5)


def test_weight_sampling_follows_the_seed():
    items = list(range(100))
    assert apply_weight(items, 0.5, random.Random(1)) == apply_weight(items, 0.5, random.Random(1))
    assert apply_weight(items, 0.5, random.Random(1)) != apply_weight(items, 0.5, random.Random(2))


# ---------------------------------------------------------------- bad input, through the CLI


def run_prepare(recipe):
    result = CliRunner().invoke(app, ["prepare", str(recipe)])
    return result, result.stdout + result.stderr


def assert_user_error(data_recipe, tmp_path, source: dict, *expected: str, **data):
    recipe = data_recipe({"sources": [source], **data})
    result, output = run_prepare(recipe)
    assert result.exit_code == 2, output
    flat = " ".join(output.split())
    for text in expected:
        assert " ".join(text.split()) in flat, output
    assert "Traceback" not in output
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_malformed_json_line_is_reported_with_its_line(tmp_path, data_recipe):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "<s>[INST] a [/INST] b</s>"}\n\n{"text": "oops"\n')
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, f"{path}:3", "malformed JSON")


def test_missing_field_lists_the_fields_the_row_has(tmp_path, data_recipe, write_jsonl):
    path = write_jsonl([{"messages": SYSTEM_CHAT}, {"prompt": "hi", "answer": "yo"}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "chat"},
                      f"{path}:2", "no `messages` field", "the row has: answer, prompt")


@pytest.mark.parametrize("format", ["chat", "completion", "alpaca"])
def test_rows_of_another_format_suggest_that_format(tmp_path, data_recipe, write_jsonl, format):
    path = write_jsonl(ROWS[format])
    assert_user_error(data_recipe, tmp_path, {"path": path}, f"{path}:1", "no `text` field",
                      f"set `format: {format}` on this source")


def test_missing_csv_column_names_the_line(tmp_path, data_recipe):
    path = tmp_path / "data.csv"
    path.write_text("question,output\nSay hi,hi\n")
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "alpaca"},
                      f"{path}:2", "no `instruction` field", "the row has: output, question")


def test_wrong_type_names_the_field_and_the_type(tmp_path, data_recipe, write_jsonl):
    path = write_jsonl([{"text": "<s>[INST] a [/INST] b</s>"}, {"text": 42}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, f"{path}:2", "`text` must be text, got int")


def test_chat_roles_out_of_order(tmp_path, data_recipe, write_jsonl):
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]
    path = write_jsonl([{"messages": SYSTEM_CHAT}, {"messages": messages}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "chat"}, f"{path}:2", "roles out of order")


def test_chat_without_an_assistant_turn(tmp_path, data_recipe, write_jsonl):
    path = write_jsonl([{"messages": SYSTEM_CHAT[:2]}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "chat"}, f"{path}:1", "no assistant turn")


@pytest.mark.parametrize("answer", ["", " \n"])
def test_chat_with_an_empty_answer_names_its_line(tmp_path, data_recipe, write_jsonl, answer):
    messages = [*SYSTEM_CHAT[:3], {"role": "user", "content": "And?"}, {"role": "assistant", "content": answer}]
    path = write_jsonl([{"messages": SYSTEM_CHAT}, {"messages": messages}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "chat"}, f"{path}:2",
                      "message 5 (assistant) is empty")


def test_chat_message_with_an_unknown_role(tmp_path, data_recipe, write_jsonl):
    path = write_jsonl([{"messages": [{"role": "human", "content": "hi"}]}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "chat"}, f"{path}:1", "message 1 needs `role`")


def test_text_not_in_the_inst_format_names_its_line(tmp_path, data_recipe, write_jsonl):
    path = write_jsonl([{"text": "<s>[INST] a [/INST] b</s>"}, {"text": "just some prose"}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, f"{path}:2", "does not follow")


def test_not_utf8_names_the_line(tmp_path, data_recipe):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "<s>[INST] a [/INST] b</s>"}\n{"text": "<s>[INST] caf\xe9 [/INST] b</s>"}\n')
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, f"{path}:2", "not UTF-8")


def test_empty_source(tmp_path, data_recipe):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, str(path), "has no examples")


def test_no_examples_left_after_filtering(tmp_path, data_recipe, write_jsonl):
    path = write_jsonl([{"text": "<s>[INST] a long question here [/INST] and a long answer too</s>"}])
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, "no examples left after filtering",
                      max_length=8, overlong="drop")



def test_no_examples_left_when_truncating_does_not_suggest_truncating(tmp_path, data_recipe, write_jsonl):
    path = write_jsonl([{"text": f"<s>[INST] {'word ' * 20} [/INST] answer</s>"}])
    result, output = run_prepare(data_recipe({"sources": [{"path": path, "format": "text"}], "max_length": 8,
                                              "overlong": "truncate"}))
    assert result.exit_code == 2 and "fix: raise data.max_length" in output
    assert "set data.overlong: truncate" not in output


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/missing.parquet", "sub/missing.csv"])
def test_a_source_that_does_not_exist(tmp_path, data_recipe, name):
    path = tmp_path / name
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, str(path), "does not exist")


def test_unknown_file_kind(tmp_path, data_recipe):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    assert_user_error(data_recipe, tmp_path, {"path": path, "format": "text"}, str(path), "cannot read `.txt` files")
