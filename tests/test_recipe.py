"""recipe/: load, sections, library_fields, builders, library_checks, probes: layered recipes merge, override, interpolate and validate
against the library classes, and become the libraries' own config objects."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from qlora_cli.recipe.builders import (
    build_bnb_config,
    build_generation_config,
    build_lora_config,
    build_training_arguments,
    split_generate,
)
from qlora_cli.errors import UserError, UserErrors, combined, locating
from qlora_cli.recipe.load import find_recipe, load_raw_recipe, load_recipe, recipe_search_path, resolve
from qlora_cli.recipe.written import to_yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def errors_of(excinfo) -> list[UserError]:
    return getattr(excinfo.value, "errors", [excinfo.value])


# --- merging and `extends` ---------------------------------------------------------------------


def test_later_recipe_files_override_earlier_ones_key_by_key(tmp_path):
    a = write(tmp_path, "a.yaml", "lora:\n  r: 4\n  lora_alpha: 8\ntraining:\n  seed: 1\n")
    b = write(tmp_path, "b.yaml", "lora:\n  r: 8\n")
    c = write(tmp_path, "c.yaml", "training:\n  seed: 3\n")
    raw = load_raw_recipe([str(a), str(b), str(c)], [])
    assert resolve(raw) == {"lora": {"r": 8, "lora_alpha": 8}, "training": {"seed": 3}}
    assert raw.origins["lora.r"].endswith("b.yaml:2")
    assert raw.origins["lora.lora_alpha"].endswith("a.yaml:3")
    assert raw.origins["training.seed"].endswith("c.yaml:2")
    assert raw.files == [a.resolve(), b.resolve(), c.resolve()]


def test_extends_a_relative_path_is_relative_to_the_file_not_the_cwd(tmp_path, monkeypatch):
    write(tmp_path, "base/parent.yaml", "lora:\n  r: 4\n  lora_alpha: 8\n")
    child = write(tmp_path, "team/child.yaml", "extends: ../base/parent.yaml\nlora:\n  r: 16\n")
    monkeypatch.chdir(write(tmp_path, "elsewhere/x", "").parent)
    assert resolve(load_raw_recipe([str(child)], [])) == {"lora": {"r": 16, "lora_alpha": 8}}


def test_extends_never_picks_a_same_named_file_in_the_cwd(tmp_path, monkeypatch):
    child = write(tmp_path, "team/child.yaml", "extends: parent.yaml\nlora:\n  r: 16\n")
    cwd = write(tmp_path, "elsewhere/parent.yaml", "lora:\n  lora_alpha: 99\n").parent
    monkeypatch.chdir(cwd)
    with pytest.raises(UserError, match="recipe `parent.yaml` not found") as excinfo:
        load_raw_recipe([str(child)], [])
    assert excinfo.value.where.endswith("child.yaml:1")


def test_extends_by_name_finds_the_shipped_recipe_and_its_own_parents(tmp_path):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\nlora:\n  r: 2\n")
    recipe = load_recipe([str(mine)])
    assert recipe.lora.r == 2  # mine
    assert recipe.model.init_from_config is not None  # tiny-mistral
    assert recipe.training.lr_scheduler_type == "cosine"  # mistral7b, which tiny-mistral extends
    assert recipe.files == [RECIPES / "mistral7b.yaml", RECIPES / "tiny-mistral.yaml", mine.resolve()]


def test_extends_by_name_finds_a_sibling_file_before_the_shipped_recipe(tmp_path):
    # A team's copy of the recipes (or a checkout's) edits its own tiny-mistral.yaml, not the installed one.
    write(tmp_path, "tiny-mistral.yaml", "extends: mistral7b\nlora:\n  lora_alpha: 3\n")
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\nlora:\n  r: 2\n")
    raw = load_raw_recipe([str(mine)], [])
    assert resolve(raw)["lora"]["lora_alpha"] == 3 and raw.origins["lora.lora_alpha"].endswith("tiny-mistral.yaml:3")
    assert raw.files[-2:] == [(tmp_path / "tiny-mistral.yaml").resolve(), mine.resolve()]
    assert raw.files[0] == RECIPES / "mistral7b.yaml"  # no sibling of that name: the search path's
    # A file that extends the shipped recipe of its own name is no cycle: it is not its own parent.
    write(tmp_path, "mistral7b.yaml", "extends: mistral7b\nlora:\n  r: 5\n")
    raw = load_raw_recipe([str(mine)], [])
    assert raw.files[:2] == [RECIPES / "mistral7b.yaml", (tmp_path / "mistral7b.yaml").resolve()]
    assert resolve(raw)["lora"]["r"] == 2 and resolve(raw)["lora"]["lora_alpha"] == 3


def test_extends_a_list_merges_in_order_and_the_file_itself_wins(tmp_path):
    write(tmp_path, "one.yaml", "lora:\n  r: 1\n  lora_alpha: 1\n  lora_dropout: 0.1\n")
    write(tmp_path, "two.yaml", "lora:\n  r: 2\n  lora_alpha: 2\n")
    child = write(tmp_path, "child.yaml", "extends: [one.yaml, two.yaml]\nlora:\n  r: 3\n")
    assert resolve(load_raw_recipe([str(child)], [])) == {"lora": {"r": 3, "lora_alpha": 2, "lora_dropout": 0.1}}


def test_an_extends_cycle_is_an_error_naming_every_file_in_it(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path, "b.yaml", "extends: c.yaml\n")
    c = write(tmp_path, "c.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle") as excinfo:
        load_raw_recipe([str(a)], [])
    message = str(excinfo.value)
    assert all(str(p.resolve()) in message for p in (a, b, c))


# --- the search path ---------------------------------------------------------------------------


def test_the_search_path_is_the_packaged_recipes_then_each_folder_of_the_variable(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv("QLORA_RECIPE_PATH", os.pathsep.join([str(first), str(second)]))
    path = recipe_search_path()
    assert path[1:] == [first, second]
    assert (path[0] / "tiny-mistral.yaml").is_file()


def test_a_name_is_found_in_a_recipe_path_folder_and_the_package_comes_first(tmp_path, monkeypatch):
    team = tmp_path / "team"
    write(team, "house-style.yaml", "lora:\n  r: 5\n")
    write(team, "tiny-mistral.yaml", "lora:\n  r: 99\n")
    monkeypatch.setenv("QLORA_RECIPE_PATH", os.pathsep.join([str(tmp_path / "absent"), str(team)]))
    assert find_recipe("house-style") == (team / "house-style.yaml").resolve()
    assert find_recipe("tiny-mistral") == RECIPES / "tiny-mistral.yaml"
    assert load_recipe(["tiny-mistral", "house-style"]).lora.r == 5


def test_a_missing_recipe_lists_every_folder_of_the_search_path(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_RECIPE_PATH", str(tmp_path / "team"))
    with pytest.raises(UserError, match="recipe `no-such-recipe` not found") as excinfo:
        load_recipe(["no-such-recipe"])
    assert str(RECIPES) in str(excinfo.value) and str(tmp_path / "team") in str(excinfo.value)
    assert "QLORA_RECIPE_PATH" in str(excinfo.value)


# --- overrides and interpolation ---------------------------------------------------------------


def test_overrides_are_yaml_typed():
    recipe = load_recipe(["tiny-mistral"], [
        "training.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]", "lora.r=8", "data.packing=false",
    ])
    assert recipe.training.learning_rate == 1e-4 and isinstance(recipe.written("training")["learning_rate"], float)
    assert recipe.written("lora")["target_modules"] == ["q_proj", "v_proj"]
    assert recipe.lora.r == 8 and recipe.data.packing is False
    assert recipe.origins["training.learning_rate"] == "override"


def test_an_override_list_replaces_the_recipe_list_instead_of_blending_into_it():
    recipe = load_recipe(["mistral7b"], ["lora.target_modules=[o_proj]"])
    assert recipe.written("lora")["target_modules"] == ["o_proj"]


def test_a_section_set_to_null_keeps_no_origin_for_the_keys_it_had():
    recipe = load_recipe(["tiny-mistral"], ["quantization=null"])
    assert recipe.quantization is None and recipe.origins["quantization"] == "override"
    assert not [key for key in recipe.origins if key.startswith("quantization.")]  # they would blame the file


def test_tilde_deletes_a_key_and_the_library_default_applies():
    recipe = load_recipe(["tiny-mistral"], ["~training.seed", "~generate"])
    assert "seed" not in recipe.written("training") and recipe.written("generate") is None
    assert recipe.training.seed == 42  # TrainingArguments' default
    assert "training.seed" not in recipe.origins


def test_deleting_a_key_the_recipe_lacks_is_an_error():
    with pytest.raises(UserError, match="cannot delete `lora.rank`"):
        load_recipe(["tiny-mistral"], ["~lora.rank"])


def test_interpolation_in_files_and_overrides_sees_the_whole_recipe(tmp_path):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\nlora:\n  lora_alpha: ${lora.r}\n")
    recipe = load_recipe([str(mine)], ["lora.r=6", "training.run_name=rank-${lora.r}"])
    assert recipe.lora.lora_alpha == 6
    assert recipe.training.run_name == "rank-6"


def test_oc_env_interpolation_reads_the_variable_or_its_default(tmp_path, monkeypatch):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\ntraining:\n  output_dir: ${oc.env:RUNS_DIR,runs/here}\n")
    monkeypatch.delenv("RUNS_DIR", raising=False)
    assert load_recipe([str(mine)]).training.output_dir == "runs/here"
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    assert load_recipe([str(mine)]).run_dir == tmp_path / "runs"


def test_an_environment_variable_for_a_number_is_text_unless_decoded(tmp_path, monkeypatch):
    monkeypatch.setenv("MAXLEN", "384")
    plain = write(tmp_path, "plain.yaml", "extends: tiny-mistral\ndata:\n  max_length: ${oc.env:MAXLEN,512}\n")
    with pytest.raises(UserError) as excinfo:
        load_recipe([str(plain)])
    (error,) = errors_of(excinfo)
    # the value is shown as written: an error never prints what came from the environment
    assert "`data.max_length` is ${oc.env:MAXLEN,512} (str)" in error.message and "'384'" not in error.message
    assert "${oc.decode:${oc.env:VAR,384}}" in error.fix
    decoded = write(tmp_path, "decoded.yaml",
                    "extends: tiny-mistral\ndata:\n  max_length: ${oc.decode:${oc.env:MAXLEN,512}}\n")
    assert load_recipe([str(decoded)]).data.max_length == 384


def test_an_interpolation_to_a_missing_key_is_a_recipe_error_naming_the_key():
    with pytest.raises(UserError, match="nope.missing") as excinfo:
        load_recipe(["tiny-mistral"], ["training.run_name=${nope.missing}"])
    assert "training.run_name" in str(excinfo.value)


def test_an_override_without_a_value_says_how_to_write_one():
    with pytest.raises(UserError, match="not KEY=VALUE"):
        load_raw_recipe(["tiny-mistral"], ["=5"])


# --- validation --------------------------------------------------------------------------------


def test_only_the_eight_sections_are_allowed(tmp_path):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\ntrainig:\n  seed: 1\n")
    with pytest.raises(UserError) as excinfo:
        load_recipe([str(mine)])
    (error,) = errors_of(excinfo)
    assert "unknown section `trainig` (did you mean `training`?)" in error.message
    assert error.where.endswith("mine.yaml:2")


def test_an_unknown_key_gives_file_line_and_the_nearest_key(tmp_path):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\n\nlora:\n  lora_alpha: 8\n  rank: 4\n")
    with pytest.raises(UserError) as excinfo:
        load_recipe([str(mine)])
    (error,) = errors_of(excinfo)
    assert error.message == "unknown key `lora.rank` (did you mean `r`?)"
    assert error.where.endswith("mine.yaml:5")


@pytest.mark.parametrize("override, expected", [
    ("training.leraning_rate=1e-4", "did you mean `learning_rate`?"),
    ("quantization.bnb_4bit_quant_typ=nf4", "did you mean `bnb_4bit_quant_type`?"),
    ("data.max_len=10", "did you mean `max_length`?"),
    ("model.tokeniser=x", "did you mean `tokenizer`?"),
    ("generate.max_new_token=5", "did you mean `max_new_tokens`?"),
])
def test_typos_in_every_section_suggest_the_real_key(override, expected):
    with pytest.raises(UserError, match=expected):
        load_recipe(["tiny-mistral"], [override])


@pytest.mark.parametrize("override, expected", [
    ("lora.r=four", "`lora.r` is 'four' (str); expected int"),
    ("training.learning_rate=fast", "expected float"),
    ("data.train_on=everything", "expected 'responses' | 'all'"),
    ("model.trust_remote_code=[x]", "expected bool"),
])
def test_a_wrong_type_names_the_expected_type(override, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        load_recipe(["tiny-mistral"], [override])


def test_a_library_objection_is_a_recipe_error_naming_the_keys():
    with pytest.raises(UserError) as excinfo:
        load_recipe(["tiny-mistral"], ["training.load_best_model_at_end=true"])
    (error,) = errors_of(excinfo)
    assert error.message.startswith("TrainingArguments rejects")
    assert "`training.load_best_model_at_end`" in error.message and "`training.save_strategy`" in error.message
    # ... and the same keys pass once the strategies match, or validation data implies evaluating at each save
    load_recipe(["tiny-mistral"], ["training.load_best_model_at_end=true", "training.eval_strategy=steps"])
    load_recipe(["tiny-mistral"], ["training.load_best_model_at_end=true", "data.val_size=0.2"])


def test_a_library_objection_quoting_only_a_value_names_its_key():
    with pytest.raises(UserError) as excinfo:
        load_recipe(["tiny-mistral"], ["training.lr_scheduler_type=bogus"])
    (error,) = errors_of(excinfo)
    assert "`training.lr_scheduler_type`" in error.message and error.where == "override"


def test_a_leading_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = load_recipe(["tiny-mistral"], ["training.output_dir=~/runs/a", "merge.output_dir=~/merged",
                                            "data.sources=[{path: ~/data.jsonl}]", "data.prepared_dir=~/prepared"])
    assert recipe.run_dir == tmp_path / "runs" / "a"
    assert recipe.merge.output_dir == str(tmp_path / "merged")
    assert recipe.data.sources[0].path == str(tmp_path / "data.jsonl")
    assert recipe.data.prepared_dir == str(tmp_path / "prepared")


def test_a_dtype_that_is_not_a_torch_dtype_is_an_error_naming_the_key():
    with pytest.raises(UserError) as excinfo:
        load_recipe(["tiny-mistral"], ["quantization.bnb_4bit_compute_dtype=bfloat61", "model.dtype=fp32"])
    messages = [e.message for e in errors_of(excinfo)]
    assert any("`quantization.bnb_4bit_compute_dtype` is 'bfloat61'" in m for m in messages)
    assert any("`model.dtype` is 'fp32'" in m for m in messages)


def test_several_mistakes_are_reported_together(tmp_path):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\nlora:\n  rank: 4\ndata:\n  max_lenght: 10\n")
    with pytest.raises(UserErrors) as excinfo:
        load_recipe([str(mine)], ["training.lr=1e-4", "merge.dtype=int8", "bogus.key=1"])
    text = str(excinfo.value)
    for expected in ("mine.yaml:3: unknown key `lora.rank`", "mine.yaml:5: unknown key `data.max_lenght`",
                     "unknown key `training.lr` (did you mean `learning_rate`?)", "`merge.dtype` is 'int8'",
                     "unknown section `bogus`"):
        assert expected in text
    assert len(excinfo.value.errors) == 5


def test_an_error_naming_a_key_is_placed_where_the_loaded_recipe_set_it_or_the_key_around_it(tmp_path):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\nmerge:\n  dtype: float32\n")
    recipe = load_recipe([str(mine)], ["lora.r=4"])
    mistakes = [UserError("cannot write it", key="merge.dtype"), UserError("`lora.r` is too large", key="lora.r"),
                UserError("exists", key="merge.output_dir"), UserError("no such", key="nowhere.at_all"),
                UserError("bad row", where="data.jsonl:7")]
    with pytest.raises(UserError) as caught, locating(recipe.origins):
        raise combined(mistakes)
    shown = [str(e) for e in caught.value.errors]
    assert shown[0].endswith("mine.yaml:3: merge.dtype: cannot write it")
    assert shown[1] == "override: `lora.r` is too large"  # the message names the key: said once
    assert shown[2].endswith("mine.yaml:2: merge.output_dir: exists")  # unset: where its section is
    assert shown[3:] == ["nowhere.at_all: no such", "data.jsonl:7: bad row"]
    # the places belong to that recipe: another one, loaded after, does not move them
    load_recipe(["tiny-mistral"], ["merge.dtype=float16"])
    assert str(caught.value.errors[0]).endswith("mine.yaml:3: merge.dtype: cannot write it")


def test_a_model_needs_exactly_one_source():
    with pytest.raises(UserError, match="exactly one of `model.name_or_path` and `model.init_from_config`"):
        load_recipe(["tiny-mistral"], ["model.name_or_path=some/model"])


def test_invalid_yaml_points_at_the_line(tmp_path):
    mine = write(tmp_path, "mine.yaml", "lora:\n  r: 4\n  bad: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML") as excinfo:
        load_recipe([str(mine)])
    assert "mine.yaml:" in excinfo.value.where


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe([str(path)])
    assert recipe.files[-1] == path
    assert recipe.model.trust_remote_code is False


# --- the resolved recipe as YAML ---------------------------------------------------------------


def test_the_resolved_recipe_written_out_loads_back_to_the_same_recipe(tmp_path):
    recipe = load_recipe(["tiny-mistral"], ["training.run_name=1e-4x", "lora.r=8"])
    again = load_recipe([str(write(tmp_path, "resolved.yaml", recipe.to_yaml()))])
    assert again.resolved == recipe.resolved


def test_strings_that_look_like_numbers_stay_strings_when_written_out(tmp_path):
    text = to_yaml({"training": {"run_name": "1e-4", "hub_model_id": "10", "output_dir": ".5"}})
    raw = load_raw_recipe([str(write(tmp_path, "r.yaml", text))], [])
    assert resolve(raw) == {"training": {"run_name": "1e-4", "hub_model_id": "10", "output_dir": ".5"}}


# --- builders: the libraries' own objects ------------------------------------------------------


def test_quantization_becomes_a_bitsandbytes_config_with_torch_dtypes():
    from transformers import BitsAndBytesConfig

    recipe = load_recipe(["tiny-mistral"], ["quantization.bnb_4bit_quant_storage=bfloat16",
                                            "quantization.bnb_4bit_compute_dtype=float32"])
    bnb = recipe.quantization
    assert isinstance(bnb, BitsAndBytesConfig)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype is torch.float32
    assert bnb.bnb_4bit_quant_storage is torch.bfloat16
    assert build_bnb_config(None) is None


def test_an_unknown_bitsandbytes_key_is_caught_although_the_class_takes_kwargs():
    with pytest.raises(UserError, match="unknown key `quantization.load_in_4bits`"):
        load_recipe(["tiny-mistral"], ["quantization.load_in_4bits=true"])


def test_lora_becomes_a_causal_lm_lora_config():
    from peft import LoraConfig, TaskType

    recipe = load_recipe(["mistral7b"], ["lora.use_rslora=true", "lora.r=12", "lora.lora_alpha=24",
                                         "lora.lora_dropout=0.1", "lora.target_modules=[q_proj,v_proj]"])
    lora = recipe.lora
    assert isinstance(lora, LoraConfig) and lora == build_lora_config(recipe.written("lora"))
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (12, 24, 0.1)
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    assert lora.use_rslora and lora.task_type == TaskType.CAUSAL_LM


def test_training_becomes_training_arguments_with_the_recipe_values(tmp_path):
    from transformers import TrainingArguments

    recipe = load_recipe(["tiny-mistral"], [f"training.output_dir={tmp_path / 'run'}", "training.learning_rate=3e-3",
                                            "training.num_train_epochs=7", "training.per_device_train_batch_size=2"])
    args = recipe.training
    assert isinstance(args, TrainingArguments)
    assert args.output_dir == str(tmp_path / "run") and recipe.run_dir == tmp_path / "run"
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (3e-3, 7, 2)
    assert args.lr_scheduler_type == recipe.resolved["training"]["lr_scheduler_type"]  # set by mistral7b
    assert args.use_cpu == (not torch.cuda.is_available())  # built for this machine
    assert build_training_arguments(recipe.written("training"), use_cpu=True).learning_rate == 3e-3


def test_a_method_gets_its_own_config_class_with_the_recipe_values():
    from trl import DPOConfig

    recipe = load_recipe(["tiny-mistral-dpo"], ["training.beta=0.25"])
    assert isinstance(recipe.training, DPOConfig) and recipe.training.beta == 0.25
    assert recipe.training.bf16 is False and recipe.training.activation_checkpointing is False  # as for sft


def test_each_method_has_its_data_formats_and_a_training_class_that_extends_training_arguments():
    from transformers import TrainingArguments

    from qlora_cli.recipe.library_fields import training_class
    from qlora_cli.recipe.sections import METHOD_FORMATS, METHODS, TRAINING_CLASSES

    # METHODS is METHOD_FORMATS' keys; the training classes are a second table that must name the same methods
    assert set(TRAINING_CLASSES) == set(METHODS)
    assert all(METHOD_FORMATS[method] for method in METHODS)
    assert all(issubclass(training_class(method), TrainingArguments) for method in METHODS)


def test_a_recipe_without_output_dir_runs_in_a_folder_named_after_it(tmp_path):
    mine = write(tmp_path, "my-run.yaml", "extends: tiny-mistral\n")
    assert load_recipe([str(mine)], ["~training.output_dir"]).run_dir == Path("runs/my-run")


def test_generate_becomes_a_generation_config_and_our_own_options():
    from transformers import GenerationConfig

    recipe = load_recipe(["tiny-mistral"], ["generate.max_new_tokens=7", "generate.batch_size=2"])
    config = recipe.generate.config
    assert isinstance(config, GenerationConfig)
    assert config.max_new_tokens == 7 and config.do_sample is False
    assert recipe.generate.options.batch_size == 2 and not hasattr(config, "batch_size")
    assert build_generation_config(recipe.written("generate")).max_new_tokens == 7
    options, fields = split_generate(recipe.written("generate"))
    assert options.batch_size == 2 and "batch_size" not in fields


def test_a_generation_config_objection_is_a_recipe_error():
    with pytest.raises(UserError, match="GenerationConfig rejects"):
        load_recipe(["tiny-mistral"], ["generate.num_beams=2", "generate.num_return_sequences=3"])


def test_the_eval_section_is_checked_like_our_other_sections(tmp_path):
    mine = write(tmp_path, "mine.yaml", "extends: tiny-mistral\neval:\n  limit: 0\n  tsks: [arc_easy]\n")
    with pytest.raises(UserError) as excinfo:
        load_recipe([str(mine)])
    assert "unknown key `eval.tsks` (did you mean `tasks`?)" in str(excinfo.value)
    recipe = load_recipe(["tiny-mistral"], ["eval.tasks=[arc_easy]", "eval.limit=5"])
    assert (recipe.eval.tasks, recipe.eval.limit, recipe.eval.after_training) == (["arc_easy"], 5, False)


def test_what_a_caller_does_with_a_written_section_leaves_the_recipe_as_written():
    recipe = load_recipe(["tiny-mistral"])
    recipe.written("training")["learning_rate"] = 1.0
    assert recipe.written("training")["learning_rate"] != 1.0 and "learning_rate: 1.0" not in recipe.to_yaml()
