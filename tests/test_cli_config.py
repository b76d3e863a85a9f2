"""`qlora config show|explain|validate` through the real command: exit codes, messages without
tracebacks, output that is a recipe again, and origins for every value."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.recipe.load import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))


def qlora(*args: str):
    return CliRunner().invoke(app, list(args))


def refused_by_validate(*args: str) -> str:
    """`qlora config validate ARGS` exits 2 without a traceback; its stderr, for the message."""
    result = qlora("config", "validate", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def line_of(path: Path, text: str) -> int:
    """1-based line of the first line of `path` that starts with `text` (ignoring indentation)."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(text))


def explain_rows(output: str) -> dict[str, tuple[str, str]]:
    """key -> (value, origin) from the table: columns are at least two spaces apart."""
    rows = {}
    for line in output.splitlines()[1:]:
        key, value, origin = re.split(r"\s{2,}", line.strip())
        rows[key] = (value, origin)
    return rows


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


ERRORS = {
    "unknown key": (["tiny-mistral", "lora.rank=4"], "unknown key `lora.rank` (did you mean `r`?)"),
    "wrong type": (["tiny-mistral", "lora.r=four"], "`lora.r` is 'four' (str); expected int"),
    "library objection": (["tiny-mistral", "training.load_best_model_at_end=true"],
                          "TrainingArguments rejects"),
    "unknown section": (["tiny-mistral", "lorra.r=4"], "unknown section `lorra` (did you mean `lora`?)"),
    "missing recipe": (["no-such-recipe"], "recipe `no-such-recipe` not found"),
    "bad interpolation": (["tiny-mistral", "training.run_name=${nope}"], "interpolation failed"),
    "bad dtype": (["tiny-mistral", "model.dtype=fp32"], "`model.dtype` is 'fp32', which is not a torch dtype"),
    "delete a missing key": (["tiny-mistral", "~lora.rank"], "cannot delete `lora.rank`"),
}


@pytest.mark.parametrize("command", ["validate", "show", "explain"])
@pytest.mark.parametrize("args, message", ERRORS.values(), ids=ERRORS.keys())
def test_every_user_mistake_exits_2_with_a_message_and_no_traceback(workdir, command, args, message):
    result = qlora("config", command, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.startswith("error:")
    assert "Traceback" not in result.output and result.stdout == ""


def test_recipe_file_errors_name_file_and_line_and_are_all_reported(workdir):
    (workdir / "mine.yaml").write_text("extends: tiny-mistral\nlora:\n  rank: 4\ntraining:\n  lr: 1.0e-4\n")
    result = qlora("config", "validate", "mine.yaml", "merge.dtype=int8")
    assert result.exit_code == 2
    assert "mine.yaml:3: unknown key `lora.rank` (did you mean `r`?)" in result.stderr
    assert "mine.yaml:5: unknown key `training.lr` (did you mean `learning_rate`?)" in result.stderr
    assert "override: `merge.dtype` is 'int8'" in result.stderr


@pytest.mark.slow  # train loads the tokenizer and plans before it opens the run folder
def test_an_error_found_after_loading_names_the_file_and_line_of_its_key(workdir):
    # The run folder is checked in the train stage, long after the recipe loaded; /proc takes no
    # new folder, even from root.
    (workdir / "mine.yaml").write_text("extends: tiny-mistral\ntraining:\n  output_dir: /proc/qlora-run\n")
    result = qlora("train", "mine.yaml")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "mine.yaml:3: training.output_dir: cannot write the run folder" in result.stderr
    result = qlora("train", "tiny-mistral", "training.output_dir=/proc/qlora-run")
    assert result.exit_code == 2 and "override: training.output_dir: cannot write the run folder" in result.stderr
    # the next command in the same process, whose recipe never loads, is not told the last one's place
    result = qlora("merge", "no-such-recipe", "training.output_dir=/proc/qlora-run")
    assert result.exit_code == 2 and "override" not in result.stderr


def test_an_extends_cycle_exits_2_naming_both_files(workdir):
    (workdir / "a.yaml").write_text("extends: b.yaml\n")
    (workdir / "b.yaml").write_text("extends: a.yaml\n")
    result = qlora("config", "validate", "a.yaml")
    assert result.exit_code == 2 and "cycle" in result.stderr
    assert str(workdir / "a.yaml") in result.stderr and str(workdir / "b.yaml") in result.stderr


def test_a_missing_recipe_lists_the_search_path(workdir, monkeypatch):
    monkeypatch.setenv("QLORA_RECIPE_PATH", str(workdir / "team"))
    result = qlora("config", "validate", "no-such-recipe")
    assert result.exit_code == 2
    assert str(RECIPES) in result.stderr and str(workdir / "team") in result.stderr


@pytest.mark.slow
def test_the_real_command_exits_2_without_a_traceback(workdir):
    result = subprocess.run([sys.executable, "-m", "qlora_cli", "config", "validate", "tiny-mistral", "lora.rank=4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown key `lora.rank` (did you mean `r`?)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_without_its_package_exits_2_naming_the_install(workdir):
    # A fresh process: TrainingArguments leaves its half-built DeepSpeed config registered, and the
    # next model build of the process (validate's generation probe) crashed on it.
    result = subprocess.run([sys.executable, "-m", "qlora_cli", "config", "validate", "tiny-mistral",
                             f"training.deepspeed={RECIPES / 'deepspeed-zero2.json'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "TrainingArguments needs a package that is not installed" in result.stderr and "deepspeed" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout and "internal error" not in result.stderr


def test_every_file_a_shipped_recipe_names_beside_the_recipes_ships_in_the_wheel():
    # An installed package finds `recipes/x.yaml`'s `../sample_*.jsonl` only if pyproject ships it.
    import tomllib

    pyproject = tomllib.loads((RECIPES.parent / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    named = {match for path in SHIPPED for match in re.findall(r"\.\./([\w.-]+)", path.read_text())}
    assert named and named <= set(shipped), f"add {sorted(named - set(shipped))} to pyproject's force-include"
    assert all(shipped[name] == f"qlora_cli/{name}" for name in named)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_validate_exits_0_on_every_shipped_recipe(workdir, path):
    by_path, by_name = qlora("config", "validate", str(path)), qlora("config", "validate", path.stem)
    assert by_path.exit_code == 0, by_path.output
    assert by_name.exit_code == 0, by_name.output
    assert "valid recipe" in by_path.stdout


def test_show_piped_is_a_recipe_that_loads_to_the_same_config(workdir):
    overrides = ["lora.r=8", "training.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]",
                 "training.run_name='1e-4'"]
    result = qlora("config", "show", "tiny-mistral", *overrides)
    assert result.exit_code == 0, result.output
    (workdir / "resolved.yaml").write_text(result.stdout)
    again = load_recipe(["resolved.yaml"])
    assert again.resolved == load_recipe(["tiny-mistral"], overrides).resolved
    assert again.training.run_name == "1e-4"
    assert qlora("config", "validate", "resolved.yaml").exit_code == 0



def test_show_keeps_an_escaped_interpolation_literal(workdir):
    (workdir / "mine.yaml").write_text('extends: tiny-mistral\ntraining:\n  run_name: "cost \\\\${HOME} ok"\n')
    result = qlora("config", "show", "mine.yaml")
    assert result.exit_code == 0, result.output
    (workdir / "resolved.yaml").write_text(result.stdout)
    assert load_recipe(["resolved.yaml"]).training.run_name == "cost ${HOME} ok"


def test_explain_gives_each_value_its_origin(workdir):
    result = qlora("config", "explain", "tiny-mistral", "training.learning_rate=1e-4",
                   "lora.target_modules=[q_proj,v_proj]")
    assert result.exit_code == 0, result.output
    rows = explain_rows(result.stdout)
    tiny, base = RECIPES / "tiny-mistral.yaml", RECIPES / "mistral7b.yaml"
    dropout = load_recipe(["tiny-mistral"]).lora.lora_dropout
    assert rows["lora.lora_dropout"] == (str(dropout), f"{tiny}:{line_of(tiny, 'lora_dropout:')}")
    assert rows["training.lr_scheduler_type"] == ("cosine", f"{base}:{line_of(base, 'lr_scheduler_type:')}")
    assert rows["training.learning_rate"] == ("0.0001", "override")
    assert rows["lora.target_modules"] == ("['q_proj', 'v_proj']", "override")
    assert rows["training.adam_beta1"] == ("0.9", "default (TrainingArguments)")
    assert rows["lora.use_dora"] == ("False", "default (LoraConfig)")
    assert rows["data.overlong"] == ("truncate", "default (qlora)")


def test_explain_lists_a_key_once_even_when_the_recipe_sets_what_is_inside_it(workdir):
    result = qlora("config", "explain", "tiny-mistral")
    keys = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert len(keys) == len(set(keys))
    assert "model.init_from_config" not in keys and "model.init_from_config.hidden_size" in keys
    assert "data.sources" not in keys and "data.sources.0.path" in keys


def test_explain_shows_a_deleted_key_as_the_library_default(workdir):
    rows = explain_rows(qlora("config", "explain", "tiny-mistral", "~training.seed").stdout)
    assert rows["training.seed"] == ("42", "default (TrainingArguments)")


@pytest.mark.slow
def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom qlora_cli.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "try:\n    app(['config', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "config" in result.stdout and "HEAVY []" in result.stdout


@pytest.mark.parametrize("override, section", [("model=5", "model"), ("data=[1,2]", "data"), ("merge=x", "merge"),
                                               ("training=[1]", "training"), ("generate=5", "generate")])
def test_a_section_that_is_not_a_mapping_exits_2_naming_it(workdir, override, section):
    assert f"`{section}` must be a mapping" in refused_by_validate("tiny-mistral", override)


@pytest.mark.parametrize("override", ["training=null", "training.output_dir=null"])
def test_a_null_training_section_or_output_dir_means_the_default_run_folder(workdir, override):
    assert qlora("config", "validate", "tiny-mistral", override).exit_code == 0
    assert load_recipe(["tiny-mistral"], [override]).run_dir == Path("runs/tiny-mistral")


@pytest.mark.parametrize("override, message", [
    ("generate.batch_size=abc", "`generate.batch_size` is 'abc' (str); expected int"),
    ("generate.quantized=maybe", "`generate.quantized` is 'maybe' (str); expected bool"),
    ("generate.system_prompt=[a]", "`generate.system_prompt` is ['a'] (list); expected str | null"),
])
def test_our_own_generate_keys_are_type_checked_by_validate(workdir, override, message):
    assert f"override: {message}" in refused_by_validate("tiny-mistral", override)


@pytest.mark.parametrize("override, message", [
    ("data.max_length=4", "`data.max_length` is 4; it must be at least 8"),
    ("data.val_size=-1", "`data.val_size` is -1; it must be a fraction in [0, 1)"),
    ("data.val_size=1.5", "`data.val_size` is 1.5; it must be a fraction in [0, 1)"),
    ("~model.init_from_config.model_type", "`model.init_from_config` needs `model_type`"),
    ("data.sources.0.limit=-1", "override: `data.sources.0.limit` is -1; it must be 1 or more"),
    ("data.sources.0.weight=-0.5", "override: `data.sources.0.weight` is -0.5; it must be 0 or more"),
    ("data.validation_sources=[{path: v.jsonl, weight: -1}]", "`data.validation_sources.0.weight` is -1"),
    ("data.template=mistrall", "`data.template` is 'mistrall' (did you mean `mistral`?): neither a template name"),
])
def test_validate_catches_what_prepare_and_model_building_would_refuse(workdir, override, message):
    assert message in refused_by_validate("tiny-mistral", override)


def test_a_quoted_recipe_path_in_the_home_folder_is_a_recipe_not_a_deletion(workdir, monkeypatch):
    monkeypatch.setenv("HOME", str(workdir))
    (workdir / "mine.yaml").write_text("extends: tiny-mistral\nlora:\n  r: 2\n")
    result = qlora("config", "show", "~/mine.yaml", "~training.seed")
    assert result.exit_code == 0, result.output
    shown = load_recipe([str(workdir / "mine.yaml")], ["~training.seed"]).to_yaml()
    assert result.output.strip() == shown.strip()


@pytest.mark.parametrize("extends", ["5", "{a: 1}", "[tiny-mistral, 3]"])
def test_an_extends_that_is_not_names_exits_2_at_its_line(workdir, extends):
    (workdir / "mine.yaml").write_text(f"lora:\n  r: 4\nextends: {extends}\n")
    assert "mine.yaml:3: `extends` must be a recipe name or a list of them" in refused_by_validate("mine.yaml")


@pytest.mark.parametrize("text, message", [
    ("training:\n  3: x\n", "mine.yaml:3: unknown key `training.3`"),
    ("data:\n  sources:\n    - path: a.jsonl\n      7: chat\n", "mine.yaml:5: unknown key `data.sources.0.7`"),
    ("4: x\n", "mine.yaml:2: unknown section `4`"),
])
def test_a_number_as_a_key_is_an_unknown_key_at_its_line(workdir, text, message):
    (workdir / "mine.yaml").write_text(f"extends: tiny-mistral\n{text}")
    assert message in refused_by_validate("mine.yaml")


def test_a_list_where_the_parent_has_a_mapping_exits_2_at_its_line(workdir):
    (workdir / "mine.yaml").write_text("extends: tiny-mistral\nlora: []\n")
    stderr = refused_by_validate("mine.yaml")
    assert "mine.yaml:2: `lora` is a list here but a mapping in" in stderr and "tiny-mistral.yaml" in stderr
    (workdir / "base.yaml").write_text("extends: tiny-mistral\ndata:\n  sources:\n    - path: a.jsonl\n")
    (workdir / "child.yaml").write_text("extends: base.yaml\ndata:\n  sources:\n    path: b.jsonl\n")
    stderr = refused_by_validate("child.yaml")
    assert "child.yaml:3: `data.sources` is a mapping here but a list in base.yaml:3" in stderr


def test_an_unclosed_interpolation_in_a_recipe_file_exits_2_at_its_line(workdir):
    (workdir / "mine.yaml").write_text('extends: tiny-mistral\ntraining:\n  run_name: "${oops"\n')
    stderr = refused_by_validate("mine.yaml")
    assert "mine.yaml:3: `training.run_name` cannot be parsed" in stderr and "object_type" not in stderr


def test_an_override_into_a_list_takes_an_index_it_has_written_either_way(workdir):
    for override in ("data.sources.0.format=chat", "data.sources[0].format=chat"):
        assert load_recipe(["tiny-mistral"], [override]).data.sources[0].format == "chat"
    stderr = refused_by_validate("tiny-mistral", "data.sources.3.format=chat")
    assert "override: `data.sources` is a list of 1 item(s), and `3` is not an index of it" in stderr
    assert "data.sources=[...]" in stderr


def test_a_missing_parent_is_reported_at_the_extends_that_names_it(workdir):
    (workdir / "mine.yaml").write_text("extends:\n  - tiny-mistral\n  - nothere.yaml\n")
    assert "mine.yaml:3: recipe `nothere.yaml` not found" in refused_by_validate("mine.yaml")


def test_a_list_item_can_be_deleted_and_interpolation_errors_carry_no_omegaconf_internals(workdir):
    recipe = load_recipe(["tiny-mistral"], ["data.sources=[{path: a.jsonl}, {path: b.jsonl}]", "~data.sources.0"])
    assert [s.path for s in recipe.data.sources] == ["b.jsonl"]
    stderr = refused_by_validate("tiny-mistral", "training.run_name=${nope}")
    assert "interpolation failed" in stderr and "object_type" not in stderr and "full_key" not in stderr


# ---------------------------------------------------------------- values the libraries would refuse later (#19)

# override -> (key the message blames, words of the library's or our reason)
REFUSED_VALUES = {
    "lora.r=0": ("lora.r", "positive integer"),
    "lora.r=-4": ("lora.r", "positive integer"),
    "lora.lora_dropout=2": ("lora.lora_dropout", "in [0, 1)"),  # peft refuses above 1 only: sections.BOUNDS
    "training.seed=-1": ("training.seed", "0 to 4294967295"),
    "training.learning_rate=-1": ("training.learning_rate", "Invalid learning rate"),
    "training.adam_beta1=2": ("training.adam_beta1", "beta"),
    "training.per_device_train_batch_size=0": ("training.per_device_train_batch_size", "positive integer"),
    "training.dataloader_num_workers=-1": ("training.dataloader_num_workers", "non-negative"),
    "training.gradient_accumulation_steps=0": ("training.gradient_accumulation_steps", "at least 1"),
    "training.num_train_epochs=-1": ("training.num_train_epochs", "more than 0"),
    "training.save_steps=0": ("training.save_steps", "more than 0"),
    "model.dtype=int8": ("model.dtype", "floating point"),
    "model.attn_implementation=bogus": ("model.attn_implementation", "sdpa"),
    "model.init_from_config.hidden_size=-1": ("model.init_from_config.hidden_size", "a model needs at least 1"),
    "model.init_from_config.num_attention_heads=3": ("model.init_from_config", "RoPE"),
    "model.init_from_config.num_key_value_heads=3": ("model.init_from_config.num_key_value_heads", "multiple"),
    "generate.num_beams=0": ("generate.num_beams", "at least 1"),
    "generate.repetition_penalty=-1": ("generate.repetition_penalty", "strictly positive"),
}


@pytest.mark.parametrize("override", REFUSED_VALUES)
def test_a_value_the_libraries_would_refuse_later_is_refused_by_validate_with_its_key(workdir, override):
    key, reason = REFUSED_VALUES[override]
    stderr = refused_by_validate("tiny-mistral", override)
    assert f"override: " in stderr and f"`{key}`" in stderr and reason in stderr, stderr


def test_a_sampling_value_is_refused_with_its_line_in_the_recipe(workdir):
    (workdir / "mine.yaml").write_text("extends: tiny-mistral\ngenerate:\n  do_sample: true\n  temperature: -1\n")
    stderr = refused_by_validate("mine.yaml")
    assert "mine.yaml:4: generate() refuses `generate.temperature`" in stderr and "strictly positive" in stderr


def test_gpu_only_settings_still_validate_on_a_machine_without_them(workdir):
    # flash attention and paged 8-bit optimizers are judged where they run, not on this laptop
    result = qlora("config", "validate", "tiny-mistral", "model.attn_implementation=flash_attention_2",
                   "training.optim=paged_adamw_8bit")
    assert result.exit_code == 0, result.output


# Numeric fields of our own sections and the most used library ones: each value is accepted or
# refused as a mistake (exit 2), never an internal error (exit 1).
NUMERIC_FIELDS = [
    "data.max_length", "data.val_size", "data.num_proc", "data.sources.0.limit", "data.sources.0.weight",
    "generate.batch_size", "generate.max_new_tokens", "generate.temperature", "generate.top_p", "generate.top_k",
    "generate.num_beams", "generate.repetition_penalty", "lora.r", "lora.lora_alpha", "lora.lora_dropout",
    "training.learning_rate", "training.num_train_epochs", "training.max_steps",
    "training.per_device_train_batch_size", "training.gradient_accumulation_steps", "training.warmup_steps",
    "training.weight_decay", "training.max_grad_norm", "training.logging_steps", "training.save_steps",
    "training.save_total_limit", "training.seed", "model.init_from_config.hidden_size",
    "model.init_from_config.num_hidden_layers", "model.init_from_config.num_attention_heads",
    "model.init_from_config.vocab_size", "model.init_from_config.seed",
]


@pytest.mark.parametrize("value", ["0", "-3", "123456789012345678901234567890"])
@pytest.mark.parametrize("key", NUMERIC_FIELDS)
def test_zero_negative_and_huge_numbers_are_accepted_or_refused_never_a_crash(workdir, key, value):
    extra = ["generate.do_sample=true"] if key in ("generate.temperature", "generate.top_p", "generate.top_k") else []
    result = qlora("config", "validate", "tiny-mistral", f"{key}={value}", *extra)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


# Issue 33's values that `config validate` passed and a run then could not use: NaN and infinity
# wherever a number is read, counts no run can use, and names the libraries lack (recipe, override, key)
DPO, KTO = str(RECIPES / "tiny-mistral-dpo.yaml"), str(RECIPES / "tiny-mistral-kto.yaml")
UNUSABLE = [
    ("tiny-mistral", "training.learning_rate=.inf", "training.learning_rate"),
    ("tiny-mistral", "training.max_grad_norm=.nan", "training.max_grad_norm"),
    ("tiny-mistral", "training.num_train_epochs=.nan", "training.num_train_epochs"),
    ("tiny-mistral", "training.num_train_epochs=.inf", "training.num_train_epochs"),
    ("tiny-mistral", "data.val_size=.nan", "data.val_size"),
    ("tiny-mistral", "data.val_size=.inf", "data.val_size"),
    ("tiny-mistral", "data.sources.0.weight=.nan", "data.sources.0.weight"),
    ("tiny-mistral", "data.sources.0.weight=-.inf", "data.sources.0.weight"),
    ("tiny-mistral", "model.init_from_config.initializer_range=.nan", "model.init_from_config.initializer_range"),
    ("tiny-mistral", "generate.temperature=.inf", "generate.temperature"),
    ("tiny-mistral", "lora.lora_dropout=-0.1", "lora.lora_dropout"),
    ("tiny-mistral", "training.max_steps=-5", "training.max_steps"),
    ("tiny-mistral", "training.logging_steps=-1", "training.logging_steps"),
    ("tiny-mistral", "training.eval_steps=0", "training.eval_steps"),
    ("tiny-mistral", "training.weight_decay=-1", "training.weight_decay"),
    ("tiny-mistral", "training.save_total_limit=-3", "training.save_total_limit"),
    ("tiny-mistral", "data.num_proc=0", "data.num_proc"),
    ("tiny-mistral", "data.num_proc=-2", "data.num_proc"),
    (DPO, "training.beta=-0.1", "training.beta"),
    (KTO, "training.desirable_weight=-1", "training.desirable_weight"),
    ("tiny-mistral", "generate.top_p=1.5", "generate.top_p"),
    ("tiny-mistral", "lora.r=1e8", "lora.r"),
    ("tiny-mistral", "lora.r=100000000", "lora.r"),
    ("tiny-mistral", "data.sources.0.limit=0", "data.sources.0.limit"),
    ("tiny-mistral", "model.tokenizer=mistral-common:v9", "model.tokenizer"),
    ("tiny-mistral", "training.report_to=carrier_pigeon", "training.report_to"),
    ("tiny-mistral", "quantization.bnb_4bit_quant_type=nf3", "quantization.bnb_4bit_quant_type"),
    (DPO, "training.loss_type=bogus", "training.loss_type"),
    (DPO, "training.loss_type=[sigmoid,bogus]", "training.loss_type"),
    ("tiny-mistral", "model.init_from_config.num_hidden_layers=0", "model.init_from_config.num_hidden_layers"),
    ("tiny-mistral", "model.init_from_config.vocab_size=0", "model.init_from_config.vocab_size"),
    ("tiny-mistral", "model.init_from_config.intermediate_size=0", "model.init_from_config.intermediate_size"),
    ("tiny-mistral", "model.init_from_config.head_dim=0", "model.init_from_config.head_dim"),
    ("tiny-mistral", "model.init_from_config.max_position_embeddings=0",
     "model.init_from_config.max_position_embeddings"),
    ("tiny-mistral", "model.init_from_config.hiden_size=512", "model.init_from_config.hiden_size"),
    ("tiny-mistral", "model.init_from_config.num_attention_heads=0", "model.init_from_config.num_attention_heads"),
    (str(RECIPES / "tiny-mistral3-vision.yaml"), "model.init_from_config.text_config.num_hidden_layers=0",
     "model.init_from_config.text_config.num_hidden_layers"),
]


@pytest.mark.parametrize("recipe, override, key", UNUSABLE, ids=[case[1] for case in UNUSABLE])
def test_a_value_no_run_can_use_exits_2_at_validate_naming_its_key(workdir, recipe, override, key):
    stderr = refused_by_validate(recipe, override)
    assert f"override: `{key}` is" in stderr, stderr


def test_unusable_values_in_one_recipe_file_are_all_reported_at_their_lines(workdir):
    (workdir / "mine.yaml").write_text("extends: tiny-mistral\nlora:\n  lora_dropout: -0.1\n"
                                       "training:\n  max_steps: -5\n  max_grad_norm: .nan\n")
    stderr = refused_by_validate("mine.yaml")
    for line, key in ((3, "lora.lora_dropout"), (5, "training.max_steps"), (6, "training.max_grad_norm")):
        assert f"mine.yaml:{line}: `{key}` is" in stderr, stderr


def test_a_mistral3_s_language_model_size_written_at_the_top_is_refused_pointing_at_text_config(workdir):
    """Mistral3Config keeps a top-level hidden_size as a loose attribute no layer reads: the run would
    train the tower and language model of the defaults (a 0.4B vision tower, 2.2 GB) instead."""
    stderr = " ".join(refused_by_validate(str(RECIPES / "tiny-mistral3-vision.yaml"),
                                          "model.init_from_config.hidden_size=512",
                                          "model.init_from_config.initializer_range=0.1").split())
    for key in ("hidden_size", "initializer_range"):
        assert (f"`model.init_from_config.{key}` is not a setting of Mistral3Config, and would be ignored "
                f"(did you mean `text_config.{key}`?)") in stderr, stderr


def test_a_value_transformers_derives_itself_is_a_known_key(workdir):
    # PixtralVisionConfig derives head_dim (a config.json key) from hidden_size / heads
    result = qlora("config", "validate", str(RECIPES / "tiny-mistral3-vision.yaml"),
                   "model.init_from_config.vision_config.head_dim=32")
    assert result.exit_code == 0, result.output
    # and a key transformers still reads and moves (rope_theta -> rope_parameters)
    assert qlora("config", "validate", "tiny-mistral", "model.init_from_config.rope_theta=1e6").exit_code == 0


@pytest.mark.parametrize("command", [[], ["config"], ["config", "validate"], ["prepare"], ["plan"], ["train"],
                                     ["merge"], ["generate"], ["eval"], ["export"]])
def test_help_shows_no_value_type_after_a_flag(command):
    result = qlora(*command, "--help")
    assert result.exit_code == 0 and "--help" in result.output, result.output
    assert "<bool>" not in result.output, result.output  # --help, --install-completion take no value


@pytest.mark.parametrize("override, message", [
    ("data.sources=[]", "the recipe has no data: `data.sources` is empty"),
    ("data.sources.0.weight=0", "every source of `data.sources` has weight 0"),
])
def test_data_that_would_leave_no_training_example_exits_2_at_validate(workdir, override, message):
    assert message in " ".join(refused_by_validate("tiny-mistral", override).split())


@pytest.mark.parametrize("override", ["lora..r=5", "lora.r.=5", ".lora.r=5"])
def test_a_key_with_an_empty_part_is_named_as_such(workdir, override):
    assert "has an empty part" in " ".join(refused_by_validate("tiny-mistral", override).split())


def test_validate_compiles_a_template_holding_a_huge_constant_at_once(workdir, monkeypatch):
    """Jinja computes constant expressions while it compiles: in transformers' sandbox alone,
    10 ** (10 ** 10) ran for hours. qlora's bounds hold from the first compile of the process."""
    import jinja2.sandbox
    from transformers.utils import chat_template_utils

    monkeypatch.setattr(chat_template_utils, "ImmutableSandboxedEnvironment", jinja2.sandbox.ImmutableSandboxedEnvironment)
    chat_template_utils._compile_jinja_template.cache_clear()
    template = "{{ 10 ** (10 ** 10) }}{% for m in messages %}{{ m.content }}{% endfor %}"
    (workdir / "mine.yaml").write_text(f"extends: tiny-mistral\ndata:\n  template: {json.dumps(template)}\n")
    result = qlora("config", "validate", "mine.yaml")  # the power is refused when prepare renders (test_prepare)
    assert result.exit_code == 0, result.output


def test_yaml_nested_thousands_deep_exits_2_naming_the_file(workdir):
    (workdir / "deep.yaml").write_text("extends: tiny-mistral\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nests too deep" in refused_by_validate("deep.yaml")


@pytest.mark.parametrize("memory", ["inf", "nan", "1e308"])
def test_a_gpu_memory_no_gpu_has_exits_2_naming_the_option(workdir, memory):
    result = qlora("plan", "tiny-mistral", "--gpu-memory", memory)
    assert result.exit_code == 2 and "--gpu-memory" in result.output, result.output
    assert "internal error" not in result.output


def test_a_nan_is_said_once_and_no_library_objects_to_it_again(workdir):
    stderr = refused_by_validate("tiny-mistral", "generate.temperature=.nan")
    assert stderr.count("generate.temperature") == 1 and "GenerationConfig" not in stderr, stderr
    assert "generation flags" not in stderr, stderr


@pytest.mark.parametrize("override", ["lora.r=${oc.env:FAKE_SECRET}", "training.learning_rate=${oc.env:FAKE_SECRET}",
                                      "model.init_from_config.hidden_size=${oc.env:FAKE_SECRET}"])
def test_an_error_shows_a_value_from_the_environment_as_written_never_the_value(workdir, monkeypatch, override):
    monkeypatch.setenv("FAKE_SECRET", "hf_s3cr3t")
    stderr = refused_by_validate("tiny-mistral", override)
    assert "hf_s3cr3t" not in stderr and "${oc.env:FAKE_SECRET}" in stderr, stderr


def test_explain_keeps_a_secret_from_the_environment_as_written(workdir, monkeypatch):
    monkeypatch.setenv("FAKE_SECRET", "hf_s3cr3t")
    result = qlora("config", "explain", "tiny-mistral", "training.run_name=${oc.env:FAKE_SECRET}",
                   "training.hub_model_id=me/${training.run_name}")
    assert result.exit_code == 0, result.output
    assert "hf_s3cr3t" not in result.output
    rows = explain_rows(result.stdout)
    assert rows["training.run_name"] == ("${oc.env:FAKE_SECRET}", "override")
    assert rows["training.hub_model_id"] == ("me/${training.run_name}", "override")


def test_explain_shows_the_defaults_of_the_methods_config_class(workdir):
    """DPO's unset keys are DPOConfig's (and qlora's: no gradient checkpointing unless asked), not TrainingArguments'."""
    result = qlora("config", "explain", str(RECIPES / "tiny-mistral-dpo.yaml"), "~training.beta", "~training.learning_rate")
    assert result.exit_code == 0, result.output
    rows = explain_rows(result.stdout)
    assert rows["training.beta"] == ("0.1", "default (DPOConfig)")
    assert rows["training.learning_rate"] == ("1e-06", "default (DPOConfig)")
    assert rows["training.gradient_checkpointing"][0] == "False"
    assert "training.beta" not in explain_rows(qlora("config", "explain", "tiny-mistral").stdout)
