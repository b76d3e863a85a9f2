"""tokenizer.py: the tokenizers a recipe can name load, convert once, and pad with <unk>, never EOS."""

from __future__ import annotations

import os

import pytest

from qlora_cli.errors import UserError
from qlora_cli.atomic import cache_root
from qlora_cli.data.tokenizer import describe_padding, load_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    os.environ.setdefault("QLORA_CACHE", str(tmp_path_factory.mktemp("qlora-cache")))


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v7"])
def test_mistral_common_tokenizers_load_as_fast_tokenizers_padded_with_unk(version):
    tokenizer = load_tokenizer(f"mistral-common:{version}")
    assert tokenizer.is_fast
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    assert describe_padding(tokenizer) == "pad token set to <unk> (id 0)"


def test_v1_encodes_inst_as_text_with_the_sentencepiece_prefix_space():
    tokenizer = load_tokenizer("mistral-common:v1")
    assert tokenizer("[INST]", add_special_tokens=False).input_ids == [733, 16289, 28793]


def test_v3_has_inst_as_a_control_token_and_v7_a_system_prompt_token():
    assert load_tokenizer("mistral-common:v3")("[INST]", add_special_tokens=False).input_ids == [3]
    assert load_tokenizer("mistral-common:v7").convert_tokens_to_ids("[SYSTEM_PROMPT]") == 16


def test_conversion_is_cached_and_leaves_no_temporary_folders():
    load_tokenizer("mistral-common:v3")
    folder = cache_root() / "tokenizers" / "mistral-common-v3"
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    load_tokenizer("mistral-common:v3")
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_unknown_mistral_common_name_is_a_user_error_listing_the_valid_names():
    with pytest.raises(UserError) as error:
        load_tokenizer("mistral-common:v4")
    assert error.value.key == "model.tokenizer"
    assert "mistral-common:v1" in error.value.fix and "mistral-common:v7" in error.value.fix


@pytest.mark.parametrize("spec", ["./no/such/tokenizer", "/no/such/tokenizer", "a/b/c"])
def test_missing_path_is_a_user_error(spec):
    with pytest.raises(UserError, match="does not exist") as error:
        load_tokenizer(spec)
    assert error.value.key == "model.tokenizer"


def test_local_folder_without_unk_pads_with_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "</s>": 2}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "</s>"
    assert describe_padding(tokenizer) == "pad token set to </s> (id 2)"


def test_a_saved_pad_eos_is_replaced_by_unk_and_another_pad_is_kept(tmp_path):
    tokenizer = load_tokenizer("mistral-common:v3")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "pad-eos")
    assert load_tokenizer(str(tmp_path / "pad-eos")).pad_token == "<unk>"
    tokenizer.pad_token = "[control_14]"
    tokenizer.save_pretrained(tmp_path / "pad-control")
    assert load_tokenizer(str(tmp_path / "pad-control")).pad_token == "[control_14]"


def test_a_folder_without_tokenizer_files_exits_2_naming_the_key(tmp_path, monkeypatch):
    from conftest import qlora

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    result = qlora("prepare", "tiny-mistral", f"model.tokenizer={tmp_path / 'empty'}")
    assert result.exit_code == 2, result.output
    assert "model.tokenizer: cannot load tokenizer" in result.stderr
    assert "Traceback" not in result.output
