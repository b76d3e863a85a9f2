"""The run folder never loses a user's files: `--overwrite` deletes only what qlora wrote, a
second run on a folder is refused, a run killed before it saved anything leaves a folder the
next run reuses, and `--resume` skips (or names) a damaged checkpoint."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_cli.atomic import LOCK_FILE, lock_folder, release_folder
from qlora_cli.errors import UserError
from qlora_cli.run_folder import checkpoint_damage

from conftest import QLORA, assert_user_error, qlora, short_run


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"qlora train ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.02)


def start_training(root: Path, sample_subset: Path, prepared_dir: Path) -> subprocess.Popen:
    """`qlora train` in a subprocess, long enough that it is still running when the test acts."""
    args = ["tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.max_steps=100000")]
    return subprocess.Popen([QLORA, "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def test_overwrite_refuses_a_project_folder_with_a_recipe_yaml_and_leaves_it_whole(tmp_path, sample_subset,
                                                                                    prepared_dir):
    project = tmp_path / "project"
    project.mkdir()
    for name, text in (("recipe.yaml", "extends: tiny-mistral\n"), ("data.jsonl", '{"text": "x"}\n'),
                       ("NOTES.md", "my notes\n"), ("run.json", '{"mine": true}\n')):
        (project / name).write_text(text)
    before = snapshot(project)
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, project, prepared_dir), "--overwrite")
    assert_user_error(result, "not a run folder qlora made", "training.output_dir")
    assert snapshot(project) == before


@pytest.mark.slow
def test_a_second_train_on_a_folder_in_use_exits_2_naming_the_first(tmp_path, sample_subset, prepared_dir):
    root = tmp_path / "run"
    first = start_training(root, sample_subset, prepared_dir)
    try:
        wait_for(lambda: (root / ".qlora.lock").is_file() and (root / ".qlora.lock").read_text(), first,
                 "lock on the run folder")
        for flags in ([], ["--overwrite"], ["--resume"]):
            result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir), *flags)
            assert_user_error(result, f"is in use by pid {first.pid}", "qlora train")
        assert first.poll() is None  # the first run goes on, its folder untouched
        assert json.loads((root / "run.json").read_text())["qlora"]["kind"] == "run"
    finally:
        stop(first)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--resume"]], ids=["plain rerun", "--resume"])
def test_a_run_killed_before_its_first_save_leaves_a_folder_the_next_run_reuses(flags, tmp_path, sample_subset,
                                                                                 prepared_dir):
    root = tmp_path / "run"
    first = start_training(root, sample_subset, prepared_dir)
    wait_for(lambda: (root / "run.json").is_file(), first, "run.json")
    stop(first)
    (root / "my-notes.txt").write_text("the user's")
    assert json.loads((root / "run.json").read_text())["qlora"]["kind"] == "run"  # claimed: a folder qlora knows
    assert not (root / "checkpoints").exists()
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.max_steps=2"),
                   *flags)
    assert result.exit_code == 0, result.output
    assert (root / "adapter" / "adapter_model.safetensors").is_file()
    assert (root / "my-notes.txt").read_text() == "the user's"
    if flags:
        assert "no checkpoint yet" in result.output and "starting the run afresh" in result.output


@pytest.fixture
def copied_run(trained_run, tmp_path):
    """A copy of the shared trained run (checkpoints 10 and 12) that a test may damage."""
    root = tmp_path / "run"
    shutil.copytree(trained_run.root, root)
    args = [arg.replace(str(trained_run.root), str(root)) for arg in trained_run.args]
    return root, args


def cut_short(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.slow
def test_resume_skips_a_damaged_last_checkpoint_says_so_and_ends_as_an_uninterrupted_run(copied_run, trained_run):
    root, args = copied_run
    cut_short(root / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors", 40)  # its header cut
    result = qlora("train", *args, "--resume")
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", "")
    assert "checkpoint-12: adapter_model.safetensors is cut short" in text and "resuming from checkpoint-10" in text
    assert json.loads((root / "run.json").read_text())["resumed_from"] == "checkpoint-10"
    resumed, uninterrupted = load_file(str(root / "adapter" / "adapter_model.safetensors")), \
        load_file(str(trained_run.adapter / "adapter_model.safetensors"))
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-5
    assert load_file(str(root / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors"))  # saved again, whole


def test_resume_with_every_checkpoint_damaged_exits_2_naming_them_and_writes_nothing(copied_run):
    root, args = copied_run
    for step in (10, 12):
        cut_short(root / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt", 1000)
    before = snapshot(root)
    result = qlora("train", *args, "training.learning_rate=1e-4", "--resume")
    assert_user_error(result, "nothing to resume", "checkpoint-12: optimizer.pt is cut short",
                      "checkpoint-10: optimizer.pt is cut short", wrapped=True)
    assert snapshot(root) == before  # recipe.yaml still the run's own


@pytest.mark.slow
def test_a_checkpoint_that_fails_to_load_exits_2_naming_it_and_keeps_the_runs_recipe(copied_run, tmp_path):
    root, args = copied_run
    # Whole files that the checks pass, but weights of other shapes: only loading can tell.
    weights = root / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors"
    from safetensors.torch import save_file

    save_file({name: torch.zeros(3) for name in load_file(str(weights))}, str(weights))
    recipe_before = (root / "recipe.yaml").read_text()
    result = qlora("train", *args, "training.learning_rate=1e-4", "--resume")
    assert_user_error(result, "cannot resume from", "checkpoint-12", "size mismatch", "delete that checkpoint",
                      wrapped=True)
    assert (root / "recipe.yaml").read_text() == recipe_before
    assert (root / "checkpoints" / "checkpoint-10").is_dir()


@pytest.mark.slow
def test_staging_left_by_a_killed_run_is_removed_by_the_next_run_on_the_folder(copied_run):
    root, args = copied_run
    leftovers = [root / ".adapter.tmp-999999999-abcdefgh", root / "checkpoints" / ".staging-14"]
    for folder in leftovers:  # as a kill -9 during the adapter's or a checkpoint's save leaves them
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
    result = qlora("train", *args, "training.max_steps=14", "--resume")
    assert result.exit_code == 0, result.output
    assert not any(folder.exists() for folder in leftovers)
    assert not list(root.rglob(".*"))  # nor the lock, once the run ended


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_exits_2_with_the_space_needed_and_keeps_the_one_before(small_disk,
                                                                                           sample_subset, prepared_dir):
    root = small_disk(6 * 1024) / "run"  # room for one checkpoint of the tiny run (3.6 MB), not two
    # --force: the plan sees that three checkpoints cannot fit, and would stop the run before it starts
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.max_steps=6"),
                   "--force")
    assert_user_error(result, "no space left to write", "checkpoint-4", "it needs about", "free at least",
                      wrapped=True)
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["checkpoint-2"]  # no staging beside it
    assert checkpoint_damage(root / "checkpoints" / "checkpoint-2") is None
    assert not list(root.rglob(".*"))


@pytest.mark.slow
def test_a_disk_too_small_for_the_run_stops_it_before_training_and_one_full_at_the_first_checkpoint_exits_2(
        small_disk, sample_subset, prepared_dir):
    root = small_disk(1024) / "run"  # the tokenizer alone (3.5 MB) is more than the disk holds
    args = ["tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.max_steps=3")]
    result = qlora("train", *args)
    assert_user_error(result, "training.output_dir", "the run needs", "MiB on disk", "KiB free under",
                      "save_total_limit", "--force", wrapped=True)
    assert not root.exists() and "parameters:" not in result.output  # no model loaded, nothing written
    # forced, the tokenizers library's bare `Exception: No space left on device` is the user's error too
    result = qlora("train", *args, "--force")
    assert_user_error(result, "no space left to write", "checkpoint-2", wrapped=True)
    assert not list(root.parent.rglob("checkpoint-*"))


@pytest.mark.slow
def test_a_value_from_the_environment_is_written_as_its_interpolation_never_as_the_value(tmp_path, sample_subset,
                                                                                         prepared_dir, monkeypatch):
    secret = "hunter2-not-for-files"
    monkeypatch.setenv("FAKE_SECRET", secret)
    root = tmp_path / "run"
    result = qlora("train", "tiny-mistral", *short_run(sample_subset, root, prepared_dir, "training.max_steps=2"),
                   "training.run_name=${oc.env:FAKE_SECRET}", "training.hub_model_id=me/${training.run_name}")
    assert result.exit_code == 0, result.output
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {"training_args.bin", "README.md", "recipe.yaml", "run.json"} <= {p.name for p in files}
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    assert [str(p) for p in files if secret.encode() in p.read_bytes()] == []
    recipe = (root / "recipe.yaml").read_text()
    assert "run_name: ${oc.env:FAKE_SECRET}" in recipe and "hub_model_id: me/${training.run_name}" in recipe
    assert "${oc.env:FAKE_SECRET}" in (root / "adapter" / "README.md").read_text()
    args = torch.load(root / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.run_name == "${oc.env:FAKE_SECRET}"


def test_a_process_that_takes_the_folder_as_the_first_lets_go_holds_it_alone(tmp_path):
    # The first holder removes its lock file and then lets go; a process polling for the folder in
    # between ends up on the file at the path, so a third one is refused, never let in beside it.
    from filelock import FileLock

    for _ in range(20):
        first = lock_folder(tmp_path, "qlora train")
        waiting = FileLock(str(tmp_path / LOCK_FILE), thread_local=False, poll_interval=1e-5)
        taker = threading.Thread(target=waiting.acquire, kwargs={"timeout": 10})
        taker.start()
        time.sleep(0.01)
        release_folder(first)
        taker.join()
        assert waiting.is_locked
        with pytest.raises(UserError, match="in use"):
            lock_folder(tmp_path, "qlora train")
        release_folder(waiting)
    assert not list(tmp_path.iterdir())  # no lock file left once the last holder let go


@pytest.mark.parametrize("record, ours", [
    ({"versions": {"qlora-cli": "0.1.0", "torch": "2.4"}}, True),  # written before the marker
    ({"versions": {"torch": "2.4"}}, False),  # someone else's run.json
    (["not", "a", "record"], False),
])
def test_a_run_folder_from_before_the_marker_is_still_ours_to_resume(tmp_path, record, ours):
    from qlora_cli.run_folder import RunFolder

    (tmp_path / "run.json").write_text(json.dumps(record))
    assert RunFolder(tmp_path).is_ours() is ours


@pytest.mark.parametrize("base, written", [
    ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1"),  # a hub id: the hub links the card to it
    ("local-model", None),  # a folder here of a name a hub id could have
    ("/home/someone/.cache/qlora/models/mistral-0123456789abcdef", None),  # a built model's cache folder
    (None, None),
])
def test_a_model_card_names_its_base_in_the_front_matter_only_when_it_is_a_hub_id(base, written, tmp_path,
                                                                                   monkeypatch):
    from huggingface_hub import ModelCard

    from qlora_cli.atomic import model_card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    card = str(model_card("adapter", base, "# Adapter\n", library_name="peft"))
    assert ModelCard(card).data.base_model == written
    assert "/home/someone" not in card and "local-model" not in card


@pytest.mark.parametrize("needed_kib, said", [(4096, "it needs about 4.0 MiB"),
                                              (16, "the disk filled while writing it, which takes more than the "
                                                   "16.0 KiB estimated")])
def test_a_full_disk_says_what_the_write_needs_or_that_it_needed_more_than_estimated(small_disk, needed_kib, said):
    """ENOSPC where the estimate fits in what is free (the partial file already removed): the message
    says the estimate was short instead of 'needs 994.6 KiB, 1004.0 KiB free' (issue 33's audit)."""
    import errno

    from qlora_cli.atomic import disk_full

    disk = small_disk(1024)
    error = disk_full(OSError(errno.ENOSPC, "No space left on device"), disk / "checkpoint-1" / "model.safetensors",
                      needed_kib * 1024, key="training.output_dir")
    assert error is not None and error.key == "training.output_dir"
    assert said in error.message and "free" in error.fix, (error.message, error.fix)
