"""Image+text fine-tuning, the model side: the shipped image data set, training a tiny mistral3 on
it through the real CLI (it learns what only the pictures say), `generate --image`, `eval` with
images, merge, and packing with images against one example per row."""

from __future__ import annotations

import importlib.util
import io
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "sample_images"


def _image_data_maker():
    spec = importlib.util.spec_from_file_location("make_image_data", ROOT / "bench" / "make_image_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_image_data_is_what_its_script_draws_byte_for_byte():
    maker = _image_data_maker()
    for split in maker.SPLITS:
        lines = []
        for name, png, asked in maker.rows(split):
            assert (IMAGES / "imgs" / name).read_bytes() == png, f"run python bench/make_image_data.py ({name})"
            lines += [json.dumps(row) + "\n" for row in asked]
        assert (IMAGES / f"{split}.jsonl").read_text(encoding="utf-8") == "".join(lines)


def test_only_the_picture_tells_the_answer_and_held_out_images_are_new():
    from PIL import Image

    answers = {}
    for split in ("train", "heldout"):
        for line in (IMAGES / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            question = next(p["text"] for p in row["messages"][0]["content"] if p["type"] == "text")
            answer = row.get("reference") or row["messages"][1]["content"]
            answers.setdefault((split, question), Counter())[answer] += 1
    # Every answer comes as often for each question: the text alone gives chance, no more.
    for (split, question), counts in answers.items():
        assert len(set(counts.values())) == 1 and len(counts) in (3, 4), (split, question, counts)
    train = {(IMAGES / "imgs" / p.name).read_bytes() for p in (IMAGES / "imgs").glob("train-*.png")}
    heldout = [p.read_bytes() for p in (IMAGES / "imgs").glob("heldout-*.png")]
    assert len(train) == 96 and len(heldout) == 24 and not train & set(heldout)
    sizes = {Image.open(io.BytesIO(data)).size for data in heldout + list(train)}
    assert len(sizes) == 4  # mixed sizes in every batch


# ---------------------------------------------------------------- training on the pictures, through the CLI

import pytest  # noqa: E402

from conftest import TrainedRun, assert_user_error, qlora  # noqa: E402
from qlora_cli.recipe.load import load_recipe  # noqa: E402

HELDOUT = IMAGES / "heldout.jsonl"
COLOURS = {"red", "green", "blue", "yellow"}


@pytest.fixture(scope="session")
def vision_run(tmp_path_factory, prepared_dir, qlora_cache) -> TrainedRun:
    """The shipped tiny-mistral3-vision recipe trained on the shipped images, its projector
    trained too (`lora.modules_to_save`), then scored by `qlora eval` on the held-out images:
    shared by every test that reads it."""
    root = tmp_path_factory.mktemp("vision") / "run"
    # 4 epochs, not the recipe's 8: every colour is learned by then (shapes come later), at half the time.
    args = ["tiny-mistral3-vision", f"data.prepared_dir={prepared_dir}", f"training.output_dir={root}",
            "training.num_train_epochs=4", "lora.modules_to_save=[multi_modal_projector]"]
    trained = qlora("train", *args)
    assert trained.exit_code == 0, trained.output
    scored = qlora("eval", root / "recipe.yaml", "--input", HELDOUT, "generate.max_new_tokens=3")  # a word and </s>
    assert scored.exit_code == 0, scored.output
    return TrainedRun(root, args, trained.output + scored.output)


def _answers(run: TrainedRun, model: str) -> list[dict]:
    lines = (run.root / "eval" / f"answers-{model}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _accuracy(answers: list[dict], colours: bool) -> float:
    asked = [a for a in answers if (a["reference"] in COLOURS) == colours]
    return sum(a["response"] == a["reference"] for a in asked) / len(asked)


@pytest.mark.slow
def test_a_tiny_mistral3_answers_what_only_the_held_out_pictures_show_far_above_its_base(vision_run):
    scores = json.loads((vision_run.root / "eval" / "results.json").read_text())
    base, adapter = _answers(vision_run, "base"), _answers(vision_run, "adapter")
    # Chance from the question alone is 1 in 4 (colour) and 1 in 3 (shape); the base says neither word.
    assert _accuracy(adapter, colours=True) >= 0.75, adapter
    assert _accuracy(base, colours=True) == 0 and _accuracy(base, colours=False) == 0
    assert scores["adapter"]["exact_match"] >= 0.5 and scores["base"]["exact_match"] == 0
    assert "exact_match" in vision_run.output and "adapter" in vision_run.output  # the side-by-side table


@pytest.mark.slow
def test_generate_with_an_image_answers_as_eval_did_and_merge_folds_the_projector_in(vision_run):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    answered = next(a for a in _answers(vision_run, "adapter") if a["response"] == a["reference"])
    image = IMAGES / answered["messages"][0]["content"][0]["path"]
    question = answered["messages"][0]["content"][1]["text"]
    generated = qlora("generate", vision_run.root, "--image", image, "--prompt", question)
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.strip().splitlines()[-1].strip() == answered["response"]

    merged = qlora("merge", vision_run.root)
    assert merged.exit_code == 0, merged.output
    folder = vision_run.root / "merged"
    # Plain transformers: the merged model, its image processor's pixels, the [IMG] rows laid out by
    # hand as PixtralProcessor would (which needs torchvision, not installed here).
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    pixels = AutoImageProcessor.from_pretrained(folder)(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    height, width = pixels["image_sizes"][0].tolist()
    processor = json.loads((folder / "processor_config.json").read_text())
    step = processor["patch_size"] * processor["spatial_merge_size"]
    grid = (["[IMG]"] * (width // step) + ["[IMG_BREAK]"]) * (height // step)
    text = "[INST]" + "".join(grid[:-1] + ["[IMG_END]"]) + question + "[/INST]"
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]])
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    assert tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip() == answered["response"]
    adapter = (vision_run.root / "adapter" / "adapter_model.safetensors")
    from safetensors import safe_open

    with safe_open(adapter, "pt") as saved:
        assert any("multi_modal_projector" in key for key in saved.keys())  # the trained projector's copy



@pytest.mark.slow
def test_export_to_gguf_writes_the_mmproj_and_llama_cpp_answers_what_the_pictures_show(vision_run):
    """`qlora export --to gguf` on the vision run: the model GGUF (its text answers checked by the
    export's engine check) and the projector's mmproj GGUF, which llama.cpp's multimodal library
    loads beside it; through llama-cpp-python's chat API the GGUF answers the colour of held-out
    pictures as transformers did (chance 1 in 4, the base model never)."""
    import base64

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the gguf extra (llama-cpp-python) is not installed: pip install '.[gguf]'")
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    exported = qlora("export", vision_run.root, "--to", "gguf")  # merges first when the merge test has not
    assert exported.exit_code == 0, exported.output
    name, folder = vision_run.root.name, vision_run.root / "export"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{name}-f16.gguf", f"{name}-mmproj-f16.gguf", "export.json"])
    assert "engine check passed" in exported.output

    class MistralImages(Llava15ChatHandler):  # llava's image plumbing, the run's [INST] layout
        DEFAULT_SYSTEM_MESSAGE = None  # llava's own would come first, as an empty [INST][/INST] turn here
        CHAT_FORMAT = ("{% for m in messages %}[INST]{% for c in m.content %}{% if c.type == 'image_url' %}"
                       "{{ c.image_url.url }}{% else %}{{ c.text }}{% endif %}{% endfor %}[/INST]{% endfor %}")

    llm = Llama(str(folder / f"{name}-f16.gguf"), n_ctx=2048, n_threads=1, verbose=False,
                chat_handler=MistralImages(str(folder / f"{name}-mmproj-f16.gguf"), verbose=False))
    colours = [a for a in _answers(vision_run, "adapter") if a["reference"] in COLOURS]
    replies = []
    for asked in colours:  # (the handler's log shows what llama.cpp was given: add_text, add_media)
        picture, question = asked["messages"][0]["content"][0]["path"], asked["messages"][0]["content"][1]["text"]
        url = "data:image/png;base64," + base64.b64encode((IMAGES / picture).read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        reply = llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=3, temperature=0)
        replies.append((reply["choices"][0]["message"]["content"], asked["reference"]))
    llm.close()  # now, not in __del__ at exit, when pytest has closed the streams llama-cpp-python redirects
    right = sum(text.strip() == reference for text, reference in replies)
    assert right / len(colours) >= 0.75, f"{right} of {len(colours)} colours: {replies[:6]}"  # measured: 22 of 24

def test_an_image_without_a_prompt_or_unreadable_exits_2_naming_it_before_any_model_loads(tmp_path):
    assert_user_error(qlora("generate", "tiny-mistral3-vision", "--image", IMAGES / "imgs" / "heldout-000.png",
                            "--input", HELDOUT, "--output", tmp_path / "a.jsonl"), "--image goes with --prompt")
    assert_user_error(qlora("generate", "tiny-mistral3-vision", "--image", tmp_path / "missing.png", "--prompt", "x"),
                      "missing.png", "--image")
    broken = tmp_path / "cut.png"
    broken.write_bytes((IMAGES / "imgs" / "heldout-000.png").read_bytes()[:60])
    assert_user_error(qlora("generate", "tiny-mistral3-vision", "--image", broken, "--prompt", "x"), "cut.png")
    assert not (tmp_path / "a.jsonl").exists()


def test_a_prompts_line_reads_its_images_beside_the_file_and_refuses_a_missing_one(tmp_path):
    from qlora_cli.export.generate import read_prompts

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes((IMAGES / "imgs" / "heldout-000.png").read_bytes())
    lines = tmp_path / "prompts.jsonl"
    part = {"type": "image", "path": "imgs/a.png"}
    lines.write_text(json.dumps({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]})
                     + "\n" + json.dumps({"messages": [{"role": "user", "content": [{**part, "path": "imgs/b.png"}]}]}))
    with pytest.raises(Exception) as refused:
        read_prompts(lines)
    assert "b.png" in str(refused.value) and f"{lines}:2" in str(getattr(refused.value, "where", refused.value))
    lines.write_text(lines.read_text().splitlines()[0])
    image = read_prompts(lines)[0].messages[0]["content"][0]["image"]
    assert image.data == (IMAGES / "imgs" / "heldout-000.png").read_bytes()


@pytest.mark.slow
def test_packing_images_gives_each_example_the_loss_it_has_alone_in_its_row(tmp_path):
    """Eight image conversations packed into rows of 256 tokens, and the same eight one per row:
    each example's loss over its answer tokens is the same (the block mask keeps the examples
    apart, each image's pixels reach its own [IMG] tokens)."""
    import torch

    from qlora_cli.data.collate import PackedCollator
    from qlora_cli.data.images import image_settings
    from qlora_cli.data.prepare import prepare_dataset
    from qlora_cli.data.tokenizer import load_recipe_tokenizer
    from qlora_cli.model.load import load_trainable_model
    from qlora_cli.recipe.load import load_recipe

    subset = tmp_path / "train.jsonl"
    subset.write_text("".join((IMAGES / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    (tmp_path / "imgs").symlink_to(IMAGES / "imgs")
    losses = {}
    for packing in (True, False):
        recipe = load_recipe(["tiny-mistral3-vision"], [f"data.sources=[{{path: {subset}, format: chat}}]",
                                                        f"data.packing={str(packing).lower()}",
                                                        f"data.prepared_dir={tmp_path / 'prepared'}"])
        tokenizer = load_recipe_tokenizer(recipe)
        rows = prepare_dataset(recipe, tokenizer).dataset["train"]
        model = load_trainable_model(recipe, tokenizer=tokenizer) if packing else model
        settings = image_settings(tokenizer, model.config)
        batch = PackedCollator(tokenizer.pad_token_id, "sdpa", image_settings=settings)([rows[i] for i in range(len(rows))])
        assert len(batch["image_sizes"]) == 8
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                     reduction="none")
        found = []
        for b, lengths in enumerate(rows["seq_lengths"]):
            start = 0
            for length in lengths:
                labels = batch["labels"][b, start + 1:start + length]
                ids = tuple(batch["input_ids"][b, start:start + length].tolist())
                found.append((ids, float(per_token[b, start:start + length - 1][labels != -100].mean())))
                start += length
        losses[packing] = dict(found)
    assert len(losses[True]) == 8 and losses[True].keys() == losses[False].keys()
    for ids, loss in losses[False].items():
        assert losses[True][ids] == pytest.approx(loss, abs=1e-4)


@pytest.mark.parametrize("named, inside", [("multi_modal_projector", "model.multi_modal_projector."),
                                           ("vision_tower", "model.vision_tower.")])
def test_naming_the_projector_or_vision_tower_gives_its_linear_layers_lora_and_q_proj_stays_the_language_models(
        named, inside, tmp_path, v1_tokenizer):
    from test_families import family_recipe

    from qlora_cli.plan.estimate import load_model_config, lora_targets
    from qlora_cli.plan.memory import model_shape

    recipe = load_recipe([family_recipe(tmp_path, "mistral3")], [f"lora.target_modules=[q_proj,v_proj,{named}]"])
    shape = model_shape(load_model_config(recipe, v1_tokenizer))
    targets = lora_targets(recipe, shape).modules
    outside = [name for name in targets if name.startswith(inside)]
    language = [name for name in targets if name not in outside]
    linear = [name for name, _, _ in shape.linears if name.startswith(inside)]
    assert outside and sorted(outside) == sorted(linear)  # every Linear inside the named part
    assert sorted(language) == sorted(f"model.language_model.layers.{layer}.self_attn.{proj}"
                                      for layer in range(2) for proj in ("q_proj", "v_proj"))


@pytest.mark.slow  # converts the tekken vocabulary (the session's vision run has done it already)
def test_dpo_on_image_pairs_exits_2_before_the_model_loads_as_the_pixels_would_not_reach_it(tmp_path):
    (tmp_path / "imgs").symlink_to(IMAGES / "imgs")
    question = [{"type": "image", "path": "imgs/train-000.png"}, {"type": "text", "text": "What colour is the shape?"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": [{"role": "user", "content": question}],
                                 "chosen": [{"role": "assistant", "content": "red"}],
                                 "rejected": [{"role": "assistant", "content": "blue"}]}) + "\n")
    result = qlora("train", "tiny-mistral3-vision", "method=dpo", f"data.sources=[{{path: {pairs}, format: preference}}]",
                   f"data.prepared_dir={tmp_path / 'prepared'}", f"training.output_dir={tmp_path / 'run'}")
    assert_user_error(result, "method: dpo", "does not train on images yet")
    assert not (tmp_path / "run" / "adapter").exists()
