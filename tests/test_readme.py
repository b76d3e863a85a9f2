"""The commands README.md and docs/*.md show run as written.

Each page's ```bash blocks are read in order: the README's first, then the pages under docs/. The
commands a CPU can run offline go through the real `qlora` command, in a temporary copy of the
checkout, in the order a reader meets them (an identical command runs once). Every other command
is listed in SKIPPED or SETUP with the reason, so that a new command is either run or listed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import SAMPLE_DATA, qlora

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands that prepare or test the checkout itself: skipped wherever they appear (first words).
SETUP = {
    "python3 -m venv": "creates the environment these tests already run in",
    ". .venv/bin/activate": "enters that environment",
    "pip install": "installs; .ci/run installs as README's second command says",
    "python -m pytest": "the test suite itself; .ci/run runs it",
}

_TRAINS = "trains a second model; the suite trains the tiny recipe once (the quick start's)"
_GPU = "a real checkpoint from the hub, trained on a GPU"
_VISION = "reads the vision run above; tests/test_vision.py runs it on its own trained vision run"
_HUB_PLAN = "reads the checkpoint's config and tokenizer from the hub"
SKIPPED = {
    "qlora train recipes/tiny-mistral.yaml training.learning_rate=1e-3 training.output_dir=runs/tiny-lr1e-3": _TRAINS,
    "qlora train recipes/tiny-mistral-kto.yaml": _TRAINS,
    "qlora train recipes/tiny-mistral-grpo.yaml": _TRAINS + "; tests/test_grpo.py trains it from an SFT adapter",
    "qlora train tiny-mistral model.init_from_config.model_type=mixtral model.init_from_config.num_local_experts=4 "
    "training.output_dir=runs/tiny-mixtral": _TRAINS,
    "qlora train recipes/tiny-mistral3-vision.yaml": _TRAINS + "; tests/test_vision.py trains it once",
    "qlora eval runs/tiny-mistral3-vision --input sample_images/heldout.jsonl": _VISION,
    "qlora generate runs/tiny-mistral3-vision --image sample_images/imgs/heldout-000.png --prompt "
    "'What colour is the shape?'": _VISION,
    "qlora train recipes/mistral7b-dpo.yaml": _GPU,
    "qlora train recipes/magistral-grpo.yaml": _GPU,
    "qlora train recipes/mixtral-8x7b.yaml": _GPU,
    "qlora train recipes/mistral7b.yaml --nproc 4": _GPU + "s",
    "qlora train recipes/mistral7b-fsdp.yaml --nproc 2": _GPU + "s",
    "qlora train recipes/mistral7b.yaml --nproc 4 training.deepspeed=recipes/deepspeed-zero2.json "
    "training.optim=adamw_torch training.output_dir=runs/mistral7b-zero2": _GPU + "s, and deepspeed",
    "torchrun --nproc_per_node 4 -m qlora_cli train recipes/mistral7b.yaml": _GPU + "s",
    "qlora train recipes/mistral7b-fsdp.yaml --nproc 8 --nnodes 2 --node-rank '$NODE_RANK' --rdzv 10.0.0.1:29500 "
    "training.output_dir=/shared/runs/mistral7b-fsdp": _GPU + "s on two machines; tests/test_distributed.py joins "
    "two nodes on 127.0.0.1",
    "accelerate launch -m qlora_cli train recipes/mistral7b.yaml": _GPU + "s, and an accelerate config",
    "qlora plan recipes/mistral7b.yaml --gpu-memory 24": _HUB_PLAN,
    "qlora plan recipes/mistral7b.yaml training.per_device_train_batch_size=8 --gpus 4": _HUB_PLAN,
    "qlora plan recipes/mixtral-8x7b.yaml --gpu-memory 80": _HUB_PLAN,
    "qlora eval runs/tiny-mistral --tasks hellaswag,arc_easy --limit 100": "lm-eval downloads these tasks' datasets",
    "qlora eval runs/tiny-mistral --tasks my-tasks/ --model other/merged": "the user's own task folder and model",
    "python -m llama_cpp.server --model runs/tiny-mistral/export/tiny-mistral-q8_0.gguf --host 127.0.0.1 --port 8000":
        "serves until stopped; tests/test_export.py serves an export and asks it through the openai client",
    "ollama create tiny-mistral -f runs/tiny-mistral/export/Modelfile": "needs Ollama, which no test installs",
    "qlora export runs/tiny-mistral --to ollama --quant q4_k_m --overwrite":
        "converts and checks again as the gguf export above did (CI time); tests/test_export.py exports --to ollama",
}
# Commands that need llama.cpp (the gguf extra, which the test extra installs): skipped where it is absent.
NEEDS_LLAMA_CPP = ("qlora export runs/tiny-mistral --to gguf",)

# Files the commands read that a user brings (the pages say what they hold): written into the copy.
_QUESTIONS = [line for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:12]]


def _question_and_answer(line: str) -> tuple[str, str]:
    question, answer = json.loads(line)["text"].split("[INST]", 1)[1].split("[/INST]", 1)
    return question.strip(), answer.replace("</s>", "").strip()


USER_FILES = {
    "qa.jsonl": "".join(json.dumps({"prompt": q, "reference": a}) + "\n" for q, a in map(_question_and_answer, _QUESTIONS)),
    "prompts.jsonl": "".join(json.dumps({"prompt": q}) + "\n" for q, _ in map(_question_and_answer, _QUESTIONS[:3])),
}

# What a command reads on its standard input (the interactive chat leaves at once).
STDIN = {"--interactive": "/exit\n"}


def shown_commands(page: Path) -> list[list[str]]:
    """The commands in a page's ```bash blocks, as words, comments dropped and `&&` chains split."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:end])
                words = words[end + 1:]
    return commands


def text_of(words: list[str]) -> str:
    return shlex.join(words)


def reason_to_skip(words: list[str]) -> str | None:
    command = text_of(words)
    setup = next((reason for start, reason in SETUP.items() if command.startswith(start)), None)
    if command.startswith(NEEDS_LLAMA_CPP) and importlib.util.find_spec("llama_cpp") is None:
        setup = "needs the gguf extra (llama-cpp-python), which is not installed here"
    return setup or SKIPPED.get(command)


def every_command() -> list[tuple[Path, list[str]]]:
    return [(page, words) for page in PAGES for words in shown_commands(page)]


# ---------------------------------------------------------------- what the pages say (fast)


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024, "README.md is over 12 KB: move the detail into docs/"


def test_every_command_shown_is_run_or_skipped_with_a_reason():
    unlisted = [f"{page.name}: {text_of(words)}" for page, words in every_command()
                if words[0] != "qlora" and reason_to_skip(words) is None]
    assert not unlisted, "commands the test cannot run: add each to SKIPPED with the reason\n" + "\n".join(unlisted)
    shown = {text_of(words) for _, words in every_command()}
    stale = [command for command in SKIPPED if command not in shown]
    assert not stale, "SKIPPED lists commands no page shows any more:\n" + "\n".join(stale)


def test_ci_installs_and_tests_as_the_readme_quick_start_says():
    quick_start = [text_of(words) for words in shown_commands(ROOT / "README.md")]
    assert "pip install torch==2.13.0 '.[test]'" in quick_start and "python -m pytest -q" in quick_start
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^pip install( -q)? torch==2\.13\.0 '\.\[test\]'$", ci, re.M), ci
    assert re.search(r"^python -m pytest -q$", ci, re.M), ci
    assert "qlora train recipes/tiny-mistral.yaml" in quick_start  # run by the test below


def _run_folder(words: list[str]) -> str:
    """The run folder a `qlora train` command writes: its last `training.output_dir=` override, or
    its last recipe's `training.output_dir` (through `extends`)."""
    overrides = [w.split("=", 1)[1] for w in words if w.startswith("training.output_dir=")]
    if overrides:
        return overrides[-1]
    flags_with_values = {"--nproc"}
    recipes = [w for i, w in enumerate(words[2:], 2) if "=" not in w and not w.startswith("--")
               and words[i - 1] not in flags_with_values]
    path = Path(recipes[-1]) if recipes[-1].endswith(".yaml") else Path("recipes", recipes[-1] + ".yaml")
    while True:
        recipe = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))
        if (recipe.get("training") or {}).get("output_dir"):
            return recipe["training"]["output_dir"]
        path = Path("recipes", recipe["extends"] + ".yaml")


def test_each_training_command_shown_has_a_run_folder_of_its_own():
    """A reader who runs the pages' commands one after the other never meets `folder exists`."""
    folders: dict[str, str] = {}
    for page, words in every_command():
        if words[:2] == ["qlora", "train"]:
            folder = _run_folder(words)
            assert folder not in folders, f"{page.name}: `{text_of(words)}` writes {folder}, as `{folders[folder]}` does"
            folders[folder] = text_of(words)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_pages_links_lead_somewhere():
    broken = []
    for page in [*PAGES, ROOT / "bench" / "RESULTS.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in {_anchor(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_architecture_page_lists_every_module():
    """docs/architecture.md's file tree names each module of the package (indented two spaces per folder)."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    tree = page.split("    qlora_cli/\n", 1)[1].split("\n\n", 1)[0]
    listed, folders = set(), []
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2 - 3
        name = line.split()[0]
        folders[depth:] = []
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            listed.add("/".join([*folders, name]))
    package = {p.relative_to(ROOT / "qlora_cli").as_posix() for p in (ROOT / "qlora_cli").rglob("*.py")}
    assert package - listed == set(), "add these modules to docs/architecture.md's file tree"
    assert listed - package == set(), "docs/architecture.md lists modules that are gone"


# ---------------------------------------------------------------- the commands (slow: trains once)


def _run(words: list[str]) -> str:
    """One shown `qlora` command, in this process; `> FILE` and `| cat` as a shell would."""
    args, redirect = words[1:], None
    if ">" in args:
        args, redirect = args[:args.index(">")], args[args.index(">") + 1]
    if args[-2:] == ["|", "cat"]:
        args = args[:-2]
    result = qlora(*args, input=next((text for flag, text in STDIN.items() if flag in args), None))
    assert result.exit_code == 0, f"`{text_of(words)}` exited {result.exit_code}:\n{result.output}"
    if redirect:
        Path(redirect).write_text(result.stdout, encoding="utf-8")
    return result.output


@pytest.mark.slow
def test_the_commands_shown_run_as_written(tmp_path, monkeypatch):
    for name in ["recipes", *(p.name for p in ROOT.glob("sample_*.jsonl"))]:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    for name, text in USER_FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    done = {}
    for page, words in every_command():
        if reason_to_skip(words) is None and text_of(words) not in done:
            done[text_of(words)] = _run(words)
    assert "qlora train recipes/tiny-mistral.yaml" in done
    # The DPO demo trains on the quick start's adapter, as its recipe says, and still answers as SFT
    # taught it (from a fresh LoRA it wrote noise; after 10 of its 30 steps, too)
    assert json.loads((tmp_path / "runs" / "tiny-mistral-dpo" / "run.json").read_text())["metrics"][
        "eval_rewards/accuracies"] == 1.0
    dpo_answer = done["qlora generate runs/tiny-mistral-dpo --prompt 'What is the capital of France?'"]
    assert "The capital of France is Paris." in dpo_answer, dpo_answer
    assert (tmp_path / "runs" / "tiny-mistral" / "merged" / "config.json").exists()
    assert json.loads((tmp_path / "runs" / "tiny-mistral" / "eval" / "results.json").read_text())["adapter"]
