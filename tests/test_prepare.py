"""prepare.py: labels train exactly the answers, lengths are enforced and counted, splits and
shuffles follow the recipe, and the cache is reused only when nothing that shapes tokens changed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.errors import UserError
from qlora_cli.data.prepare import build_dataset, data_fingerprint, prepare_dataset
from qlora_cli.recipe.load import load_recipe
from qlora_cli.data.templates import IGNORE_INDEX

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital."},
]


def build(data_recipe, data: dict, tokenizer, seed: int = 42, **overrides):
    """(DatasetDict, PrepareSummary) for a data section, unpacked unless it says otherwise."""
    recipe = load_recipe([str(data_recipe({"packing": False, **data}))], [f"{k}={v}" for k, v in overrides.items()])
    return build_dataset(recipe.data, tokenizer, seed, "test")


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of positions whose label is their own id (the tokens the loss trains)."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == token:
            current.append(token)
        else:
            assert label == IGNORE_INDEX, "a label is either the token's id or -100"
            if current:
                runs.append(current)
            current = []
    return runs + ([current] if current else [])


def numbered_texts(count: int, answer_words: int = 1) -> list[dict]:
    return [{"text": f"<s>[INST] question {i} [/INST] {' '.join(['answer'] * answer_words)} {i}</s>"}
            for i in range(count)]


# ---------------------------------------------------------------- labels


def test_responses_train_each_answer_and_its_eos_and_nothing_else(data_recipe, write_jsonl, v1_tokenizer):
    path = write_jsonl([{"messages": CHAT}])
    dataset, _ = build(data_recipe, {"sources": [{"path": path, "format": "chat"}]}, v1_tokenizer)
    row = dataset["train"][0]
    runs = trained_runs(row["input_ids"], row["labels"])
    eos = v1_tokenizer.eos_token_id
    assert [v1_tokenizer.decode(run) for run in runs] == ["Paris.</s>", "Rome is the capital.</s>"]
    assert all(run[-1] == eos for run in runs)
    untrained = v1_tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == IGNORE_INDEX])
    assert "Answer briefly." in untrained and "Capital of France?" in untrained and "[/INST]" in untrained
    assert row["input_ids"][0] == v1_tokenizer.bos_token_id and row["labels"][0] == IGNORE_INDEX


@pytest.mark.parametrize("format, row", [
    ("alpaca", {"instruction": "Translate", "input": "chat", "output": "cat"}),
    ("completion", {"prompt": "Once upon", "completion": "a time"}),
    ("text", {"text": "<s>[INST] Once upon [/INST] a time</s>"}),
])
def test_responses_train_only_the_answer_in_every_format(data_recipe, write_jsonl, v1_tokenizer, format, row):
    dataset, _ = build(data_recipe, {"sources": [{"path": write_jsonl([row]), "format": format}]}, v1_tokenizer)
    out = dataset["train"][0]
    answer = {"alpaca": "cat", "completion": "a time", "text": "a time"}[format]
    assert [v1_tokenizer.decode(r) for r in trained_runs(out["input_ids"], out["labels"])] == [f"{answer}</s>"]


def test_train_on_all_trains_every_token(data_recipe, write_jsonl, v1_tokenizer):
    path = write_jsonl([{"messages": CHAT}])
    dataset, summary = build(data_recipe, {"sources": [{"path": path, "format": "chat"}], "train_on": "all"},
                             v1_tokenizer)
    row = dataset["train"][0]
    assert row["labels"] == row["input_ids"]
    assert summary.trained_tokens["train"] == summary.tokens["train"]


def test_text_format_turns_s_markers_into_single_special_ids_and_never_doubles_bos(
        data_recipe, write_jsonl, v1_tokenizer):
    rows = [{"text": "<s>[INST] Hi [/INST] Hello</s>"}, {"text": "[INST] Hi [/INST] Hello</s>"},
            {"text": "<s>[INST] Hi [/INST] Hello</s><s>[INST] Again [/INST] Bye</s>"}]
    dataset, _ = build(data_recipe, {"sources": [{"path": write_jsonl(rows), "format": "text"}], "shuffle": False},
                       v1_tokenizer)
    bos, eos = v1_tokenizer.bos_token_id, v1_tokenizer.eos_token_id
    with_bos, without_bos, two_turns = dataset["train"]["input_ids"]
    assert with_bos == without_bos
    assert with_bos[:2] != [bos, bos] and with_bos.count(bos) == 1 and with_bos[0] == bos
    assert with_bos[-1] == eos and with_bos.count(eos) == 1
    assert two_turns.count(bos) == 2 and two_turns.count(eos) == 2
    pieces = v1_tokenizer.convert_ids_to_tokens(two_turns)
    assert not any(p in pieces for p in ("<", "▁<", "s", ">")), "the markers are special ids, not text"


def test_plain_text_with_train_on_all_gets_one_bos_and_eos_ids(data_recipe, write_jsonl, v1_tokenizer):
    path = write_jsonl([{"text": "<s>Some prose about cats.</s>"}])
    dataset, _ = build(data_recipe, {"sources": [{"path": path, "format": "text"}], "train_on": "all"}, v1_tokenizer)
    ids = dataset["train"][0]["input_ids"]
    assert ids[0] == v1_tokenizer.bos_token_id and ids[1] != v1_tokenizer.bos_token_id
    assert ids[-1] == v1_tokenizer.eos_token_id
    assert v1_tokenizer.decode(ids[1:-1]) == "Some prose about cats."


# ---------------------------------------------------------------- max_length


def _mixed_lengths(write_jsonl):
    # 3 short examples; 2 long ones whose answer starts well before max_length; 1 whose answer starts after it
    rows = numbered_texts(3) + numbered_texts(2, answer_words=40)
    rows.append({"text": f"<s>[INST] {'long question ' * 30} [/INST] a</s>"})
    return write_jsonl(rows)


def test_overlong_truncate_cuts_to_max_length_and_counts(data_recipe, write_jsonl, v1_tokenizer):
    source = {"path": _mixed_lengths(write_jsonl), "format": "text"}
    dataset, summary = build(data_recipe, {"sources": [source], "max_length": 24, "overlong": "truncate"}, v1_tokenizer)
    counts = summary.sources[0]
    assert (counts.read, counts.kept, counts.truncated, counts.dropped) == (6, 5, 2, 1)
    assert max(len(ids) for ids in dataset["train"]["input_ids"]) == 24
    assert summary.examples["train"] == 5


def test_overlong_drop_leaves_out_long_examples_and_counts(data_recipe, write_jsonl, v1_tokenizer):
    source = {"path": _mixed_lengths(write_jsonl), "format": "text"}
    dataset, summary = build(data_recipe, {"sources": [source], "max_length": 24, "overlong": "drop"}, v1_tokenizer)
    counts = summary.sources[0]
    assert (counts.read, counts.kept, counts.truncated, counts.dropped) == (6, 3, 0, 3)
    assert len(dataset["train"]) == 3


def test_overlong_error_names_the_example(data_recipe, write_jsonl, v1_tokenizer):
    path = _mixed_lengths(write_jsonl)
    with pytest.raises(UserError, match="more than data.max_length=24") as err:
        build(data_recipe, {"sources": [{"path": path, "format": "text"}], "max_length": 24, "overlong": "error"},
              v1_tokenizer)
    assert err.value.where == f"{path}:4"


def test_a_template_error_names_the_file_and_line(data_recipe, write_jsonl, v1_tokenizer):
    path = write_jsonl(numbered_texts(2) + [{"text": "prose without turns"}])
    with pytest.raises(UserError, match="does not follow") as err:
        build(data_recipe, {"sources": [{"path": path, "format": "text"}]}, v1_tokenizer)
    assert err.value.where == f"{path}:3"


# ---------------------------------------------------------------- splits and order


@pytest.mark.parametrize("val_size, expected", [(0.2, 4), (3, 3)])
def test_val_size_as_fraction_or_count(data_recipe, write_jsonl, v1_tokenizer, val_size, expected):
    source = {"path": write_jsonl(numbered_texts(20)), "format": "text"}
    dataset, summary = build(data_recipe, {"sources": [source], "val_size": val_size}, v1_tokenizer)
    assert summary.examples == {"train": 20 - expected, "validation": expected}
    assert (len(dataset["train"]), len(dataset["validation"])) == (20 - expected, expected)
    train = {tuple(ids) for ids in dataset["train"]["input_ids"]}
    assert not train & {tuple(ids) for ids in dataset["validation"]["input_ids"]}


@pytest.mark.parametrize("val_size, message, fix", [(3, "leaving none to train on", "smaller fraction"),
                                                     (0.1, "holds out no example", "larger fraction")])
def test_val_size_that_leaves_no_training_or_no_validation_data_is_refused(val_size, message, fix, data_recipe,
                                                                           write_jsonl, v1_tokenizer):
    source = {"path": write_jsonl(numbered_texts(3)), "format": "text"}
    with pytest.raises(UserError, match=message) as excinfo:
        build(data_recipe, {"sources": [source], "val_size": val_size}, v1_tokenizer)
    assert fix in excinfo.value.fix


def test_validation_sources_become_the_validation_split(data_recipe, write_jsonl, v1_tokenizer):
    train, held_out = write_jsonl(numbered_texts(5), "train.jsonl"), write_jsonl(numbered_texts(2, 3), "val.jsonl")
    dataset, summary = build(data_recipe, {"sources": [{"path": train, "format": "text"}],
                                           "validation_sources": [{"path": held_out, "format": "text"}]}, v1_tokenizer)
    assert summary.examples == {"train": 5, "validation": 2}
    assert all("answer answer answer" in v1_tokenizer.decode(ids) for ids in dataset["validation"]["input_ids"])


def _order(data_recipe, write_jsonl, tokenizer, seed, **data):
    source = {"path": write_jsonl(numbered_texts(30)), "format": "text"}
    dataset, _ = build(data_recipe, {"sources": [source], **data}, tokenizer, seed=seed)
    return [tokenizer.decode(ids).split()[-1] for ids in dataset["train"]["input_ids"]]


def test_shuffle_follows_the_seed_and_can_be_turned_off(data_recipe, write_jsonl, v1_tokenizer):
    first = _order(data_recipe, write_jsonl, v1_tokenizer, 1)
    assert first == _order(data_recipe, write_jsonl, v1_tokenizer, 1)
    assert first != _order(data_recipe, write_jsonl, v1_tokenizer, 2)
    assert sorted(first) == sorted(_order(data_recipe, write_jsonl, v1_tokenizer, 2))
    assert _order(data_recipe, write_jsonl, v1_tokenizer, 1, shuffle=False) == [f"{i}</s>" for i in range(30)]


def test_weight_mixes_sources(data_recipe, write_jsonl, v1_tokenizer):
    a = write_jsonl(numbered_texts(10), "a.jsonl")
    b = write_jsonl([{"text": f"<s>[INST] other {i} [/INST] b</s>"} for i in range(10)], "b.jsonl")
    _, summary = build(data_recipe, {"sources": [{"path": a, "format": "text", "weight": 2.0},
                                                 {"path": b, "format": "text", "weight": 0.3}]}, v1_tokenizer)
    assert [(c.read, c.kept) for c in summary.sources] == [(10, 20), (10, 3)]
    assert summary.examples["train"] == 23


def test_weighted_examples_never_reach_the_validation_split(data_recipe, write_jsonl, v1_tokenizer):
    # Split first, then repeat: a repeat in both splits makes the eval loss measure memorisation.
    path = write_jsonl(numbered_texts(100))
    dataset, summary = build(data_recipe, {"sources": [{"path": path, "format": "text", "weight": 2.0}],
                                           "val_size": 0.1}, v1_tokenizer)
    train = {tuple(ids) for ids in dataset["train"]["input_ids"]}
    validation = [tuple(ids) for ids in dataset["validation"]["input_ids"]]
    assert len(validation) == len(set(validation)) == 10 and not train & set(validation)
    assert (summary.examples["train"], len(train)) == (180, 90)
    assert (summary.sources[0].read, summary.sources[0].kept) == (100, 190)


def test_a_source_weighted_0_is_left_out_of_both_splits(data_recipe, write_jsonl, v1_tokenizer):
    a = write_jsonl(numbered_texts(20), "a.jsonl")
    b = write_jsonl([{"text": f"<s>[INST] other {i} [/INST] b</s>"} for i in range(20)], "b.jsonl")
    sources = [{"path": a, "format": "text"}, {"path": b, "format": "text", "weight": 0}]
    dataset, _ = build(data_recipe, {"sources": sources, "val_size": 4, "packing": False}, v1_tokenizer)
    decoded = [v1_tokenizer.decode(ids) for split in ("train", "validation") for ids in dataset[split]["input_ids"]]
    assert len(decoded) == 20 and not any("other" in text for text in decoded)


def test_weights_that_keep_nothing_exit_2_naming_the_sources(data_recipe, write_jsonl, v1_tokenizer):
    path = write_jsonl(numbered_texts(4))
    with pytest.raises(UserError, match="has weight 0: no training example is left") as excinfo:  # at load
        build(data_recipe, {"sources": [{"path": path, "format": "text", "weight": 0}]}, v1_tokenizer)
    assert excinfo.value.key == "data.sources"


# ---------------------------------------------------------------- the cache


def test_same_fingerprint_is_reused_and_says_so(data_recipe, write_jsonl, v1_tokenizer):
    recipe = load_recipe([str(data_recipe({"sources": [{"path": write_jsonl(numbered_texts(4)), "format": "text"}]}))])
    first = prepare_dataset(recipe, v1_tokenizer)
    again = prepare_dataset(recipe, v1_tokenizer)
    assert (first.reused, again.reused) == (False, True)
    assert first.path == again.path and first.path.name == first.summary.fingerprint
    assert again.dataset["train"]["input_ids"] == first.dataset["train"]["input_ids"]
    assert prepare_dataset(recipe, v1_tokenizer, force=True).reused is False
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name], "no temporary folder left"


def test_a_cache_entry_without_qlora_s_marker_is_prepared_again_and_marked(data_recipe, write_jsonl, v1_tokenizer):
    from qlora_cli.atomic import has_marker
    from qlora_cli.data.prepare import SUMMARY_FILE

    recipe = load_recipe([str(data_recipe({"sources": [{"path": write_jsonl(numbered_texts(4)), "format": "text"}]}))])
    first = prepare_dataset(recipe, v1_tokenizer)
    summary = first.path / SUMMARY_FILE
    assert has_marker(summary, "prepared")
    unmarked = json.loads(summary.read_text())
    del unmarked["qlora"]  # as a folder someone else made, or an earlier version wrote
    summary.write_text(json.dumps(unmarked))
    again = prepare_dataset(recipe, v1_tokenizer)
    assert again.reused is False and again.path == first.path and has_marker(summary, "prepared")


def _cut_arrow(entry: Path) -> None:
    arrow = next((entry / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:len(arrow.read_bytes()) // 2])


@pytest.mark.parametrize("damage", [
    _cut_arrow,
    lambda entry: (entry / "qlora_prepared.json").write_text('{"qlora": {"kind": "prepared"}, "sources": 3}'),
    lambda entry: (entry / "train" / "state.json").unlink(),
    lambda entry: (entry / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}'),
], ids=["truncated-arrow", "corrupt-summary", "missing-state", "split-missing"])
def test_a_damaged_cache_entry_is_named_and_prepared_again(damage, data_recipe, write_jsonl):
    recipe = data_recipe({"sources": [{"path": write_jsonl(numbered_texts(40)), "format": "text"}]})
    first = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert first.exit_code == 0, first.output
    entry = next((recipe.parent / "prepared").iterdir())
    rows = (entry / "train" / "state.json").read_text()
    damage(entry)
    again = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert again.exit_code == 0, again.output
    assert "data prepared" in again.stdout and "the cached entry was damaged" in again.stdout, again.stdout
    assert (entry / "train" / "state.json").read_text() == rows
    assert "data reused" in CliRunner().invoke(app, ["prepare", str(recipe)]).stdout


def test_fingerprint_changes_with_the_data_bytes_the_data_section_and_the_tokenizer(
        data_recipe, write_jsonl, v1_tokenizer):
    from qlora_cli.data.tokenizer import load_tokenizer

    path = write_jsonl(numbered_texts(4))
    recipe = load_recipe([str(data_recipe({"sources": [{"path": path, "format": "text"}]}))])
    before = data_fingerprint(recipe.data, v1_tokenizer, 42)
    assert data_fingerprint(recipe.data, v1_tokenizer, 42) == before
    assert data_fingerprint(recipe.data, load_tokenizer("mistral-common:v3"), 42) != before
    assert data_fingerprint(recipe.data, v1_tokenizer, 7) != before
    for override in ("data.max_length=128", "data.train_on=all", "data.sources.0.limit=2"):
        changed = load_recipe([str(data_recipe({"sources": [{"path": path, "format": "text"}]}))], [override])
        assert data_fingerprint(changed.data, v1_tokenizer, 42) != before, override
    moved = load_recipe([str(data_recipe({"sources": [{"path": path, "format": "text"}]}))],
                        ["data.prepared_dir=elsewhere", "data.num_proc=2"])
    assert data_fingerprint(moved.data, v1_tokenizer, 42) == before, "where it is cached does not shape tokens"
    with path.open("a") as f:
        f.write(json.dumps({"text": "<s>[INST] one more [/INST] row</s>"}) + "\n")
    assert data_fingerprint(recipe.data, v1_tokenizer, 42) != before


def test_a_changed_file_is_prepared_again(data_recipe, write_jsonl, v1_tokenizer):
    path = write_jsonl(numbered_texts(4))
    recipe = load_recipe([str(data_recipe({"sources": [{"path": path, "format": "text"}]}))])
    first = prepare_dataset(recipe, v1_tokenizer)
    write_jsonl(numbered_texts(6))
    second = prepare_dataset(recipe, v1_tokenizer)
    assert second.reused is False and second.path != first.path and second.summary.examples["train"] == 6


def test_a_failed_prepare_leaves_no_folder(data_recipe, write_jsonl, v1_tokenizer, tmp_path):
    path = write_jsonl(numbered_texts(2) + [{"text": 5}])
    recipe = load_recipe([str(data_recipe({"sources": [{"path": path, "format": "text"}]}))])
    with pytest.raises(UserError):
        prepare_dataset(recipe, v1_tokenizer)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("under, problem", [("", "is a file"), ("sub", "lies under")])
def test_a_prepared_dir_that_cannot_be_a_folder_exits_2_naming_the_key(data_recipe, write_jsonl, tmp_path,
                                                                       monkeypatch, under, problem, relative):
    from conftest import assert_user_error

    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    folder = Path("afile") / under if relative else tmp_path / "afile" / under
    recipe = data_recipe({"sources": [{"path": write_jsonl(numbered_texts(2)), "format": "text"}],
                          "prepared_dir": str(folder)})
    result = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert_user_error(result, "`data.prepared_dir`", problem, "recipe.yaml:")
    assert under or "lies under" not in result.output  # the file itself is not "under" itself


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    from qlora_cli.atomic import atomic_folder

    target = tmp_path / "prepared" / "abc"
    with pytest.raises(RuntimeError):
        with atomic_folder(target, replace=True) as tmp:
            (tmp / "half.arrow").write_text("x")
            raise RuntimeError("disk full")
    assert list((tmp_path / "prepared").iterdir()) == []
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "whole.arrow").write_text("x")
        assert not target.exists()
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["abc"]
    assert [p.name for p in target.iterdir()] == ["whole.arrow"]


def test_atomic_folder_is_as_readable_as_any_new_folder(tmp_path):
    # A team shares prepared data, adapters and merged models: not owner-only like a temp folder.
    import os

    from qlora_cli.atomic import atomic_folder

    previous = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "shared") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755


def test_atomic_folder_finished_first_by_another_process_is_kept(tmp_path):
    from qlora_cli.atomic import atomic_folder

    target = tmp_path / "cache" / "model"
    with atomic_folder(target) as tmp:
        (tmp / "mine").write_text("x")
        target.mkdir(parents=True)  # another rank renamed its copy into place meanwhile
        (target / "theirs").write_text("x")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # our temporary folder is gone


# ---------------------------------------------------------------- the command


def test_prepare_command_prints_the_summary_and_show_prints_the_example(data_recipe, write_jsonl):
    rows = [{"text": "<s>[INST] What is the capital of France? [/INST] Paris.</s>"}]
    rows += [{"text": f"<s>[INST] {'word ' * 300} [/INST] long</s>"}]
    recipe = data_recipe({"sources": [{"path": write_jsonl(rows), "format": "text"}], "overlong": "drop"})
    result = CliRunner().invoke(app, ["prepare", str(recipe), "--show", "1"])
    assert result.exit_code == 0, result.output
    output = result.stdout
    # not a terminal: the trained tokens are marked in plain text, not by colour alone
    assert "What is the capital of France? [/INST]{+ Paris.</s>+}" in " ".join(output.split())
    assert "trained tokens are shown between {+ and +}" in output
    assert "example 1" in output and "example 2" not in output
    assert "data prepared" in output and "train: 1 examples in 1 rows" in output
    assert re.search(r"\s2\s+1\s+0\s+1\s", output), output  # read, kept, truncated, dropped
    assert "data.jsonl" in output and "…" not in output, "a long source path wraps, never cut"
    again = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert again.exit_code == 0 and "data reused" in again.stdout


def test_num_proc_gives_the_same_rows_and_the_same_error_location(data_recipe, write_jsonl, v1_tokenizer):
    rows = numbered_texts(1200)
    path = write_jsonl(rows)
    serial, _ = build(data_recipe, {"sources": [{"path": path, "format": "text"}]}, v1_tokenizer)
    parallel, _ = build(data_recipe, {"sources": [{"path": path, "format": "text"}], "num_proc": 2}, v1_tokenizer)
    assert parallel["train"]["input_ids"] == serial["train"]["input_ids"]
    assert parallel["train"]["labels"] == serial["train"]["labels"]
    bad = write_jsonl(rows[:1100] + [{"text": "prose"}] + rows[1100:], "bad.jsonl")
    with pytest.raises(UserError, match="does not follow") as err:
        build(data_recipe, {"sources": [{"path": bad, "format": "text"}], "num_proc": 2}, v1_tokenizer)
    assert err.value.where == f"{bad}:1101"


def test_staging_of_a_writer_on_another_machine_is_kept_and_this_machines_dead_one_removed(tmp_path):
    import os

    from qlora_cli.atomic import atomic_folder, remove_stale_temporaries

    with atomic_folder(tmp_path / "abc") as live:  # what this process is writing now
        assert live.name.startswith(f".abc.tmp-{os.getpid()}@")
        host = live.name.split("@", 1)[1].rsplit("-", 1)[0]
        dead_here = tmp_path / f".abc.tmp-999999999@{host}-x1"
        dead_before_hosts = tmp_path / ".abc.tmp-999999999-x2"  # as earlier builds named it
        elsewhere = tmp_path / ".abc.tmp-999999999@other.machine-x3"  # a prepare on another machine
        old_here, old_elsewhere = tmp_path / f".abc.old-999999999@{host}", tmp_path / ".abc.old-999999999@other"
        for folder in (dead_here, dead_before_hosts, elsewhere, old_here, old_elsewhere):
            folder.mkdir()
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted([dead_here, dead_before_hosts, old_here])
        assert live.is_dir() and elsewhere.is_dir() and old_elsewhere.is_dir()
    assert (tmp_path / "abc").is_dir()


@pytest.mark.slow
def test_a_prepare_killed_while_saving_leaves_staging_that_the_next_prepare_removes(data_recipe, write_jsonl,
                                                                                    tmp_path):
    import signal
    import subprocess
    import time

    from conftest import QLORA

    rows = [{"text": f"[INST] question {i} [/INST] answer {i} of many</s>"} for i in range(4000)]
    recipe = data_recipe({"sources": [{"path": write_jsonl(rows), "format": "text"}], "packing": False})
    cache = tmp_path / "prepared"
    for _ in range(5):  # the staging lives for a fraction of a second: kill -9 when it appears
        process = subprocess.Popen([QLORA, "prepare", str(recipe), "--force"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None and not list(cache.glob(".*.tmp-*")):
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if list(cache.glob(".*.tmp-*")):
            break
    staging = list(cache.glob(".*.tmp-*"))
    assert staging, "no prepare was caught while saving"
    result = CliRunner().invoke(app, ["prepare", str(recipe), "data.max_length=128"])  # another fingerprint
    assert result.exit_code == 0, result.output
    assert not list(cache.glob(".*")), "staging folders left"


@pytest.mark.slow
def test_a_full_disk_while_saving_exits_2_with_the_space_needed_and_leaves_no_staging(data_recipe, write_jsonl,
                                                                                      small_disk):
    disk = small_disk(64)
    rows = [{"text": f"[INST] question {i} [/INST] answer {i} of many</s>"} for i in range(2000)]
    recipe = data_recipe({"sources": [{"path": write_jsonl(rows), "format": "text"}], "packing": False,
                          "prepared_dir": str(disk)})
    result = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "no space left" in result.output and "free at least" in result.output
    assert list(disk.iterdir()) == []


# ---------------------------------------------------------------- damaged or hostile files (#19)

QUESTION = {"prompt": "What is the capital of France?", "completion": "Paris."}
HOSTILE_FILES = {
    "nested 10,000 deep": ("data.jsonl", json.dumps(QUESTION) + "\n" + "[" * 10_000 + "]" * 10_000 + "\n",
                           "completion", "data.jsonl:2", "nested too deeply"),
    "nested json array": ("data.json", "[" + json.dumps(QUESTION) + ", " + "[" * 10_000 + "]" * 10_000 + "]",
                          "completion", "data.json", "nested too deeply"),
    "lone surrogate": ("data.jsonl", json.dumps(QUESTION) + '\n{"prompt": "a\\ud800b", "completion": "c"}\n',
                       "completion", "data.jsonl:2", "lone surrogate"),
    "lone surrogate in a chat": ("data.jsonl", '{"messages": [{"role": "user", "content": "hi"}, '
                                 '{"role": "assistant", "content": "\\udfff"}]}\n', "chat", "data.jsonl:1",
                                 "lone surrogate"),
}


@pytest.mark.parametrize("name, text, format, where, problem", HOSTILE_FILES.values(), ids=HOSTILE_FILES)
def test_a_hostile_data_file_exits_2_at_its_line_and_writes_nothing(data_recipe, tmp_path, name, text, format,
                                                                     where, problem):
    from conftest import assert_user_error

    (tmp_path / name).write_text(text, encoding="utf-8")
    recipe = data_recipe({"sources": [{"path": tmp_path / name, "format": format}]})
    assert_user_error(CliRunner().invoke(app, ["prepare", str(recipe)]), where, problem)
    assert not (tmp_path / "prepared").exists()


def test_a_csv_field_longer_than_csv_s_own_limit_is_read_whole(data_recipe, tmp_path, v1_tokenizer):
    answer = "Paris " * 30_000  # 180 kB, over csv's default field limit of 128 KiB
    (tmp_path / "data.csv").write_text(f'prompt,completion\n"Capital of France?","{answer}"\n', encoding="utf-8")
    recipe = data_recipe({"sources": [{"path": tmp_path / "data.csv", "format": "completion"}]})
    result = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "train: 1 examples" in result.output


def test_nul_bytes_and_a_megabyte_line_are_text_like_any_other(data_recipe, write_jsonl, v1_tokenizer):
    # decided (#19): a NUL is a character the tokenizer encodes as a byte; a line of 1 MB is one
    # example, cut to data.max_length (or dropped, or refused, as data.overlong says)
    rows = [{"prompt": "nul \x00 byte", "completion": "ok"}, {"prompt": "long", "completion": "word " * 200_000}]
    recipe = data_recipe({"sources": [{"path": write_jsonl(rows), "format": "completion"}]})
    result = CliRunner().invoke(app, ["prepare", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "train: 2 examples" in result.output, result.output
    assert re.search(r"\s2\s+2\s+1\s+0\s", result.output), result.output  # read, kept, truncated, dropped


@pytest.mark.parametrize("show", ["-1", "-5"])
def test_prepare_refuses_a_negative_show_count(show):
    result = CliRunner().invoke(app, ["prepare", "tiny-mistral", "--show", show])
    assert result.exit_code == 2 and "--show" in result.output and "Traceback" not in result.output


BAD_TEMPLATES = {
    "raises": ("{% if messages|length > 2 %}{{ raise_exception('only one turn') }}{% endif %}"
               "{% for m in messages %}{{ m.content }}{% endfor %}", "data.jsonl:2", "only one turn"),
    "escapes the sandbox": ("{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}",
                            "data.jsonl:1", "sandbox"),
}
# Issue 33: templates that asked for gigabytes, recursed without end, or read what the sandbox
# forbids as empty text. Each exits 2 at once, within a few hundred MB (Jinja's sandbox with bounds).
ANSWERS = "{% for m in messages %}{{ m.content }}{% endfor %}"
BAD_TEMPLATES.update({
    "a string 10**12 long": ("{{ 'a' * 10**12 }}" + ANSWERS, "data.jsonl:1", "repeated 1,000,000,000,000 times"),
    "a power of 10**10 digits": ("{{ 10 ** (10 ** 10) }}" + ANSWERS, "data.jsonl:1", "bits"),
    "a macro that calls itself": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}" + ANSWERS, "data.jsonl:1",
                                  "calls itself without end"),
    "a macro that doubles its calls": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                                       "{{ f(40) }}" + ANSWERS, "data.jsonl:1", "calls in one render"),
    "a string doubled in a loop": ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                                   "{% endfor %}" + ANSWERS, "data.jsonl:1", "more than a chat template may make"),
    "a string doubled by a macro": ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
                                    "{{ f('a', 60) }}" + ANSWERS, "data.jsonl:1", "more than a chat template may make"),
    "a width of 10**12": ("{{ 'a'|center(10**12) }}" + ANSWERS, "data.jsonl:1", "wider than a chat template may make"),
    "reads messages.__class__": ("{{ messages.__class__ }}" + ANSWERS, "data.jsonl:1", "'__class__' of a list"),
    "reads a global's __globals__": ("{{ raise_exception.__globals__ }}" + ANSWERS, "data.jsonl:1", "'__globals__'"),
    "reads a namespace's __init__": ("{{ namespace.__init__ }}" + ANSWERS, "data.jsonl:1", "'__init__'"),
})


@pytest.mark.parametrize("template, where, problem", BAD_TEMPLATES.values(), ids=BAD_TEMPLATES)
def test_a_chat_template_that_fails_on_an_example_exits_2_there(data_recipe, write_jsonl, tmp_path, template,
                                                               where, problem):
    from conftest import assert_user_error

    one = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": one}, {"messages": one + one}]
    recipe = data_recipe({"sources": [{"path": write_jsonl(rows), "format": "chat"}], "template": template})
    assert_user_error(CliRunner().invoke(app, ["prepare", str(recipe)]), where, problem, "data.template")
    assert not (tmp_path / "prepared").exists()


def test_a_chat_template_that_does_not_parse_is_refused_by_validate(data_recipe, write_jsonl):
    from conftest import assert_user_error

    recipe = data_recipe({"sources": [{"path": write_jsonl(numbered_texts(1))}], "template": "{% if %}{{ x }}"})
    result = CliRunner().invoke(app, ["config", "validate", str(recipe)])
    assert_user_error(result, "recipe.yaml:", "`data.template` is not valid Jinja", "line 1 of the template")
