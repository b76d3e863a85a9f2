"""`qlora eval` through the real command: base, adapter and merged model side by side, results
in <run>/eval written whole, bad input refused with its file, line or key."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from qlora_cli.terminal import render
from qlora_cli.errors import UserError
from qlora_cli.eval.evaluate import Measured, read_eval_records, write_results

from conftest import assert_user_error, qlora, sample_pairs

PAIRS = sample_pairs(12)
SHORT_ANSWERS = ["generate.max_new_tokens=40", "generate.batch_size=12"]  # references: <= ~30 tokens; one batch


def write_references(path: Path, pairs=PAIRS) -> Path:
    path.write_text("".join(json.dumps({"prompt": q, "reference": a}) + "\n" for q, a in pairs))
    return path


def write_local_task(folder: Path) -> Path:
    """An lm-eval multiple-choice task on two training questions, its dataset a local JSONL."""
    folder.mkdir()
    rows = [{"question": PAIRS[0][0], "choices": [PAIRS[0][1], "Berlin is the capital of Italy."], "answer": 0},
            {"question": PAIRS[2][0], "choices": ["It is 54.", PAIRS[2][1]], "answer": 1}]
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "qa.yaml").write_text(f"""task: sample_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "[INST] {{{{question}}}} [/INST]"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


# ---------------------------------------------------------------- without a model


def test_a_line_without_reference_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "Hi?", "reference": "Hello."}\n{"prompt": "What is 2+2?", "answer": "4"}\n')
    with pytest.raises(UserError) as caught:
        read_eval_records(path)
    assert caught.value.where == f"{path}:2"
    assert "`reference`" in caught.value.message and "prompt, answer" in caught.value.message


def test_a_run_folder_without_adapter_exits_2(tmp_path, write_jsonl):
    questions = write_references(tmp_path / "qa.jsonl")
    result = qlora("eval", "tiny-mistral", f"training.output_dir={tmp_path / 'no-run'}", "--input", questions)
    assert_user_error(result, "adapter folder", "does not exist", "train first", wrapped=True)
    assert not (tmp_path / "no-run").exists()


@pytest.mark.parametrize("recipe_name", ["tiny-mistral-dpo", "tiny-mistral-grpo"])
def test_a_preference_or_grpo_runs_validation_split_is_not_fed_to_the_loss_and_alone_is_nothing_to_evaluate(
        tmp_path, recipe_name):
    # GRPO's prompts have no answer: fed to the loss they crashed the collator (KeyError, exit 1).
    from qlora_cli.eval.evaluate import validation_rows
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe([recipe_name], [f"training.output_dir={tmp_path / 'run'}"])
    assert recipe.data.has_validation and validation_rows(recipe, tokenizer=None) is None
    result = qlora("eval", recipe_name, f"training.output_dir={tmp_path / 'run'}")
    assert_user_error(result, "nothing to evaluate", "preference data or GRPO prompts", "run.json", wrapped=True)


@pytest.mark.parametrize("env, runs", [
    ({}, True),                                              # one process, or the `--nproc` launcher
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),                # rank 0 of torchrun / accelerate launch
    ({"RANK": "1", "LOCAL_RANK": "1"}, False),               # any other rank
    ({"RANK": "0", "LOCAL_RANK": "0", "QLORA_RANK_STATUS": "/tmp/x"}, False),  # a `--nproc` worker: the launcher evaluates
])
def test_eval_after_training_runs_once_on_global_rank_zero(monkeypatch, env, runs):
    from qlora_cli.cli import evaluates_here

    for name in ("RANK", "LOCAL_RANK", "QLORA_RANK_STATUS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert evaluates_here() is runs


def test_tasks_without_lm_eval_installed_say_how_to_install(monkeypatch):
    from qlora_cli.eval.tasks import load_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(UserError) as caught:
        load_tasks(["hellaswag"])
    assert "pip install '.[eval]'" in str(caught.value) and "qlora-cli[" not in str(caught.value)


def test_an_interrupted_write_keeps_the_previous_results_whole(tmp_path):
    folder = tmp_path / "eval"
    write_results(folder, {"base": Measured({"exact_match": 0.0}), "adapter": Measured({"exact_match": 1.0})})
    before = (folder / "results.json").read_text()
    broken = Measured({"exact_match": 0.5}, answers=[{"response": object()}])  # not JSON: fails mid-write
    with pytest.raises(TypeError):
        write_results(folder, {"base": Measured({"exact_match": 0.5}), "adapter": broken})
    assert (folder / "results.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporary folder left


def test_results_replace_only_the_files_eval_writes_and_keep_the_users(tmp_path):
    folder = tmp_path / "eval"
    write_results(folder, {"base": Measured({"exact_match": 0.0}, answers=[{"response": "a"}]),
                           "merged": Measured({"exact_match": 0.0}, answers=[{"response": "b"}])})
    (folder / "notes.md").write_text("my notes")
    (folder / "answers-mine.jsonl").write_text("{}\n")
    write_results(folder, {"base": Measured({"exact_match": 1.0}, answers=[{"response": "c"}])})
    assert sorted(p.name for p in folder.iterdir()) == ["answers-base.jsonl", "answers-mine.jsonl", "notes.md",
                                                        "results.json"]  # the old merged answers are gone
    assert json.loads((folder / "results.json").read_text()) == {"base": {"exact_match": 1.0}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_plain_table_has_a_row_per_metric_a_column_per_model_and_the_difference():
    out = io.StringIO()
    render.eval_table(Console(file=out, width=200), {"base": {"exact_match": 0.0, "chrf": 4.5},
                                                     "adapter": {"exact_match": 1.0, "chrf": 100.0}})
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["metric", "base", "adapter", "adapter", "-", "base"]
    assert lines[1].split() == ["exact_match", "0.0000", "1.0000", "+1.0000"]
    assert lines[2].split() == ["chrf", "4.5000", "100.0000", "+95.5000"]
    assert "\x1b" not in out.getvalue() and "─" not in out.getvalue()


# ---------------------------------------------------------------- on trained tiny models


@pytest.mark.slow
def test_adapter_answers_its_training_pairs_and_base_does_not(answering_run, tmp_path):
    """Done when: the adapter's exact match >= 0.9 on the pairs it was trained on, the base's
    near 0, and a local lm-eval task runs offline, all from one command."""
    questions = write_references(tmp_path / "qa.jsonl")
    task = write_local_task(tmp_path / "tasks")
    result = qlora("eval", answering_run.root, *SHORT_ANSWERS, "--input", questions, "--tasks", task)
    assert result.exit_code == 0, result.output
    folder = answering_run.root / "eval"
    scores = json.loads((folder / "results.json").read_text())
    assert set(scores) == {"base", "adapter"}  # no merged folder, no --model
    assert scores["adapter"]["exact_match"] >= 0.9 and scores["base"]["exact_match"] <= 0.1
    assert scores["adapter"]["token_f1"] > scores["base"]["token_f1"]
    assert scores["adapter"]["chrf"] > 90 > scores["base"]["chrf"]
    assert scores["adapter"]["sample_qa/acc"] == 1.0
    answers = [json.loads(line) for line in (folder / "answers-adapter.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == [q for q, _ in PAIRS]
    assert sum(a["response"] == ref for a, (_, ref) in zip(answers, PAIRS)) >= 11
    lm_eval_output = json.loads((folder / "lm-eval-adapter.json").read_text())
    assert lm_eval_output["results"]["sample_qa"]["acc,none"] == 1.0
    assert len(lm_eval_output["samples"]["sample_qa"]) == 2
    table = result.stdout.splitlines()
    row = next(line for line in table if line.startswith("exact_match "))
    assert row.split()[2] == f"{scores['adapter']['exact_match']:.4f}"
    assert f"results: {folder / 'results.json'}" in result.stdout


@pytest.mark.slow
def test_merged_model_scores_like_the_adapter_and_validation_loss_drops(trained_run, tmp_path):
    merged = tmp_path / "merged"
    assert qlora("merge", trained_run.root, f"merge.output_dir={merged}").exit_code == 0
    questions = write_references(tmp_path / "qa.jsonl", PAIRS[:4])
    # The validation rows were trained on: the adapter's loss on them is below the base's.
    result = qlora("eval", trained_run.root, "data.val_size=3", "generate.max_new_tokens=8",
                   "--input", questions, "--model", merged)
    assert result.exit_code == 0, result.output
    scores = json.loads((trained_run.root / "eval" / "results.json").read_text())
    assert list(scores) == ["base", "adapter", "merged"]
    base, adapter, merged_scores = scores["base"], scores["adapter"], scores["merged"]
    assert adapter["eval_loss"] < base["eval_loss"]
    assert merged_scores["eval_loss"] == pytest.approx(adapter["eval_loss"], abs=0.05)
    assert adapter["eval_perplexity"] == pytest.approx(2.718281828 ** adapter["eval_loss"], rel=1e-6)
    assert (trained_run.root / "eval" / "answers-merged.jsonl").is_file()
    assert "merged - base" in result.stdout.splitlines()[0] or "merged - base" in result.stdout


@pytest.mark.slow
def test_bad_eval_input_exits_2_before_loading(trained_run, tmp_path):
    no_reference = tmp_path / "qa.jsonl"
    no_reference.write_text('{"prompt": "What is 2+2?"}\n')
    assert_user_error(qlora("eval", trained_run.root, "--input", no_reference), f"{no_reference}:1", "`reference`",
                      wrapped=True)
    assert_user_error(qlora("eval", trained_run.root, "--tasks", tmp_path / "missing.yaml"),
                      "task file", "missing.yaml", "does not exist", wrapped=True)
    assert_user_error(qlora("eval", trained_run.root, "--tasks", "hellaswg"),
                      "unknown lm-eval task `hellaswg`", "hellaswag", wrapped=True)


def test_a_local_task_whose_data_cannot_load_is_refused_before_any_model_loads(tmp_path):
    from qlora_cli.eval.tasks import load_tasks

    task = write_local_task(tmp_path / "tasks")
    (task / "questions.jsonl").unlink()
    with pytest.raises(UserError) as caught:
        load_tasks([str(task)])
    assert "lm-eval cannot load the tasks sample_qa" in caught.value.message
    assert caught.value.where == "--tasks"


def test_a_local_task_folder_loads_offline_without_indexing_lm_eval_tasks(tmp_path):
    from qlora_cli.eval.tasks import load_tasks

    suite = load_tasks([str(write_local_task(tmp_path / "tasks"))])
    assert suite.names == ["sample_qa"] and suite.manager.all_tasks == ["sample_qa"]


@pytest.mark.slow
def test_train_runs_the_recipes_eval_section_at_its_end(tmp_path, sample_subset, prepared_dir, monkeypatch):
    from conftest import short_run

    import qlora_cli.data.prepare as prepare
    import qlora_cli.data.tokenizer as tokenizer
    import qlora_cli.model.load as model_load

    loads = {"data fingerprints": 0, "tokenizers": 0}

    def counted(name, function):
        def count(*args, **kwargs):
            loads[name] += 1
            return function(*args, **kwargs)
        return count

    # The eval after training reuses the run's tokenizer and prepared data (its validation split).
    monkeypatch.setattr(prepare, "data_fingerprint", counted("data fingerprints", prepare.data_fingerprint))
    # model/load.py bound load_recipe_tokenizer at import: count the loads made through it too
    count_tokenizers = counted("tokenizers", tokenizer.load_recipe_tokenizer)
    monkeypatch.setattr(tokenizer, "load_recipe_tokenizer", count_tokenizers)
    monkeypatch.setattr(model_load, "load_recipe_tokenizer", count_tokenizers)
    questions = write_references(tmp_path / "qa.jsonl")
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.num_train_epochs=1",
                                                        "training.save_steps=100", "data.val_size=2"),
                   "eval.after_training=true", f"eval.input={questions}", "eval.limit=2", "generate.max_new_tokens=4")
    assert result.exit_code == 0, result.output
    assert loads == {"data fingerprints": 1, "tokenizers": 1}
    scores = json.loads((root / "eval" / "results.json").read_text())
    assert list(scores) == ["base", "adapter"] and {"exact_match", "token_f1", "chrf"} <= set(scores["adapter"])
    assert "eval_loss" in scores["adapter"]  # the validation split the run prepared
    assert len((root / "eval" / "answers-adapter.jsonl").read_text().splitlines()) == 2  # eval.limit
    assert result.stdout.index("done") < result.stdout.index("exact_match")


def test_train_refuses_a_bad_eval_section_before_training(tmp_path, sample_subset, prepared_dir):
    from conftest import short_run

    no_reference = tmp_path / "qa.jsonl"
    no_reference.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n')
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir),
                   "eval.after_training=true", f"eval.input={no_reference}")
    assert_user_error(result, f"{no_reference}:1", "`reference`", wrapped=True)
    assert not root.exists()
