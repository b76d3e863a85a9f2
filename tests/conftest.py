"""Shared fixtures: an isolated cache and recipe path for every test, and the tiny model built once."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# A 64-wide, 2-layer Mistral with rank-4 LoRA: real shapes, 4-bit layers and tokenizer, in seconds.
# Shapes are set here, not taken from the recipe, so tuning the recipe cannot break the tests.
TINY_OVERRIDES = [
    "model.init_from_config.hidden_size=64",
    "model.init_from_config.intermediate_size=128",
    "model.init_from_config.num_hidden_layers=2",
    "model.init_from_config.num_attention_heads=4",
    "model.init_from_config.num_key_value_heads=2",
    "lora.target_modules=all-linear",
    "lora.r=4",
    "lora.lora_alpha=8",
]


# Fixtures that train, load a model or convert a tekken vocabulary: a test using one (directly or
# through another fixture) is in the slow tier even if its own body is quick.
SLOW_FIXTURES = {"tiny_model", "trained_run", "answering_run", "tekken_folder"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


_modules_frozen = [0]


def pytest_runtest_setup(item):
    # Imported modules (torch, transformers, peft: millions of objects) live until the session
    # ends, and each full garbage collection scanned them all again: a tenth of the fast tier's
    # time. Whenever a test has imported more, what is alive between tests is frozen (never scanned
    # again); garbage is collected first, so none is kept.
    if len(sys.modules) != _modules_frozen[0]:
        gc.collect()
        gc.freeze()
        _modules_frozen[0] = len(sys.modules)


@pytest.fixture(scope="session", autouse=True)
def qlora_cache(tmp_path_factory):
    """Built models and converted tokenizers go to a temporary folder, never ~/.cache/qlora."""
    folder = tmp_path_factory.mktemp("qlora-cache")
    previous = os.environ.get("QLORA_CACHE")
    os.environ["QLORA_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("QLORA_CACHE", None)
    else:
        os.environ["QLORA_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def _converted_tokenizers_read_once(qlora_cache):
    """Each converted tokenizer folder in the test cache is read by transformers once per session;
    later loads of the same unchanged files get a fresh copy of that tokenizer.

    Reading a converted folder takes ~0.5 s (transformers parses its 3.5 MB tokenizer.json in
    Python three times) and the CLI tests load one per command, about a hundred times in the fast
    tier. A pickle copy of the tokenizer transformers built takes ~0.07 s and is a separate object,
    so a test that sets a pad token or a chat template changes only its own. Keyed by the folder's
    files (name, size, mtime, inode): a folder converted again is read again. Other paths and any
    extra argument go straight to transformers."""
    import pickle

    from transformers import AutoTokenizer

    read = AutoTokenizer.from_pretrained
    converted = qlora_cache / "tokenizers"
    loaded: dict[tuple, bytes] = {}

    def from_pretrained(path, *args, **kwargs):
        folder = Path(path)
        if args or kwargs or folder.parent != converted or not folder.is_dir():
            return read(path, *args, **kwargs)
        key = (folder, *sorted((f.name, s.st_size, s.st_mtime_ns, s.st_ino) for f in folder.iterdir()
                               for s in [f.stat()]))
        if key not in loaded:
            loaded[key] = pickle.dumps(read(path))
        return pickle.loads(loaded[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
        yield


@pytest.fixture(autouse=True)
def _no_user_recipe_path(monkeypatch):
    # A developer's own $QLORA_RECIPE_PATH must not change what the tests find.
    monkeypatch.delenv("QLORA_RECIPE_PATH", raising=False)


@pytest.fixture(scope="session")
def tiny_recipe():
    """recipes/tiny-mistral.yaml shrunk to 64 wide: the recipe the model tests load."""
    from qlora_cli.recipe.load import load_recipe

    return load_recipe(["tiny-mistral"], TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_model(tiny_recipe):
    """The tiny recipe's 4-bit base + LoRA `PeftModel`, built once per session."""
    from qlora_cli.model.load import load_trainable_model

    return load_trainable_model(tiny_recipe)


# ---------------------------------------------------------------- data (test_sources, test_prepare, test_packing)


@pytest.fixture(scope="session")
def v1_tokenizer(qlora_cache):
    """mistral-common's v1 tokenizer as an HF fast tokenizer (the one tiny-mistral uses)."""
    from qlora_cli.data.tokenizer import load_tokenizer

    return load_tokenizer("mistral-common:v1")


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name="data.jsonl") -> path of a jsonl file with one JSON object per row."""
    import json

    def write(rows: list, name: str = "data.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def data_recipe(tmp_path):
    """data_recipe(data_section) -> a recipe file extending tiny-mistral with that data section.

    `data.prepared_dir` defaults to tmp_path/"prepared"; source paths are written as strings.
    """
    import yaml

    def write(data: dict, name: str = "recipe.yaml"):
        data = {"prepared_dir": str(tmp_path / "prepared"), **data}
        for key in ("sources", "validation_sources"):
            for source in data.get(key, []):
                source["path"] = str(source["path"])
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"extends": "tiny-mistral", "data": data}, sort_keys=False))
        return path

    return write


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib) -> a folder on a tmpfs of that many KiB: a disk that fills up, for real.
    Mounting needs root (CI containers often are); elsewhere the test is skipped."""
    mounts = []

    def mount(kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path, leave: int = 0) -> None:
    """Write a file in `folder` until its disk has no more than `leave` bytes free."""
    with open(folder / "filler", "wb") as filler:
        while shutil.disk_usage(folder).free > leave:
            try:
                filler.write(b"x" * max(min(shutil.disk_usage(folder).free - leave, 65536), 1))
                filler.flush()
            except OSError:
                break


# ---------------------------------------------------------------- runs (test_train, test_merge_generate, test_cli_end_to_end)

# The installed console script, beside this Python (the venv's bin/).
QLORA = shutil.which("qlora", path=str(Path(sys.executable).parent)) or "qlora"
SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data.jsonl"

# The tiny recipe at its own width (256), pinned here, trained until it repeats its training answers:
# instructions are ~30 tokens, so 64-token rows give ~7 optimizer steps per epoch of 12 examples.
ANSWERING_OVERRIDES = [
    "model.init_from_config.hidden_size=256",
    "model.init_from_config.intermediate_size=512",
    "model.init_from_config.num_hidden_layers=2",
    "model.init_from_config.num_attention_heads=4",
    "model.init_from_config.num_key_value_heads=2",
    "lora.target_modules=all-linear",
    "lora.r=16",
    "lora.lora_alpha=32",
    "training.learning_rate=5e-3",
    "data.max_length=64",
    "training.num_train_epochs=6",
]


def qlora(*args, input: str | None = None):
    """Run the real `qlora` command in this process (faster than a subprocess: imports are warm);
    `input` is its stdin. Returns click's `Result`."""
    from typer.testing import CliRunner

    from qlora_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_user_error(result, *needles: str, wrapped: bool = False) -> None:
    """Exit 2, a message naming each needle, and no traceback. `wrapped`: look for the needles with
    the console's line breaks taken out (it may wrap a long path)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    text = result.output.replace("\n", "") if wrapped else result.output
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{result.output}"


def sample_pairs(count: int) -> list[tuple[str, str]]:
    """(instruction, response) of the first `count` rows of sample_data.jsonl."""
    pairs = []
    for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:count]:
        question, answer = json.loads(line)["text"].split("[INST]", 1)[1].split("[/INST]", 1)
        pairs.append((question.strip(), answer.replace("</s>", "").strip()))
    return pairs


def short_run(data: Path, output_dir: Path, prepared_dir: Path, *extra: str) -> list[str]:
    """Overrides for a short run of the 64-wide tiny model: 12 steps on 12 examples, a checkpoint
    every 2 steps, a log line every step."""
    return [
        *TINY_OVERRIDES,
        f"data.sources=[{{path: {data}, format: text}}]",
        f"data.prepared_dir={prepared_dir}",
        f"training.output_dir={output_dir}",
        "training.num_train_epochs=6",
        "training.save_steps=2",
        "training.logging_steps=1",
        *extra,
    ]


@dataclass
class TrainedRun:
    """A finished `qlora train` run: its folder and the recipe arguments it was trained with."""

    root: Path
    args: list[str]
    output: str

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"


@pytest.fixture(scope="session")
def sample_subset(tmp_path_factory) -> Path:
    """The first 12 rows of sample_data.jsonl, as a data file of their own."""
    path = tmp_path_factory.mktemp("data") / "sample12.jsonl"
    path.write_text("".join(SAMPLE_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:12]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """One prepared-data cache for every run in the session (entries are keyed by fingerprint)."""
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_subset, prepared_dir, qlora_cache) -> TrainedRun:
    """A short 64-wide run through `qlora train`, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("trained") / "run"
    args = ["tiny-mistral", *short_run(sample_subset, root, prepared_dir)]
    result = qlora("train", *args)
    assert result.exit_code == 0, result.output
    return TrainedRun(root, args, result.output)


@pytest.fixture(scope="session")
def answering_run(tmp_path_factory, sample_subset, prepared_dir, qlora_cache) -> TrainedRun:
    """The tiny recipe trained on 12 sample rows until it answers them, through the `qlora`
    executable in a subprocess (the real command line; bench/answering_time.py times it)."""
    root = tmp_path_factory.mktemp("answering") / "run"
    args = ["tiny-mistral", *ANSWERING_OVERRIDES, f"data.sources=[{{path: {sample_subset}, format: text}}]",
            f"data.prepared_dir={prepared_dir}", f"training.output_dir={root}"]
    done = subprocess.run([QLORA, "train", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return TrainedRun(root, args, done.stdout + done.stderr)


def stop_at_first_step(args: list[str]) -> tuple[int, str]:
    """`qlora train ARGS` in a subprocess, sent SIGTERM when it prints its first step: its exit
    code and everything it printed."""
    import signal

    process = subprocess.Popen([QLORA, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step "):
            process.send_signal(signal.SIGTERM)
            break
    output.append(process.communicate(timeout=600)[0])
    return process.returncode, "".join(output)
