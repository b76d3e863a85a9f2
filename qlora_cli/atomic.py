"""Folders that appear whole or not at all (written beside the target, renamed when complete),
and the folders qlora made: the marker that tells them from a user's, the lock that keeps a second
process out, and the staging folders that killed processes left behind."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from qlora_cli.errors import UserError


class atomic_folder:
    """`with atomic_folder(target) as tmp:` writes into a temporary folder beside `target` and
    renames it into place only when the block completes; on error nothing is left behind."""

    def __init__(self, target: Path, replace: bool = False):
        self.target, self.replace = Path(target), replace

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # The pid and host in the name tell a later run whether the writer is still alive
        # (remove_stale_temporaries): a cache on a shared disk is written from several machines.
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-{_writer()}-", dir=self.target.parent))
        # mkdtemp makes an owner-only folder; what we keep is shared as any new folder would be.
        self.tmp.chmod(0o777 & ~current_umask())
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        share_files(self.tmp)
        if self.target.exists() and self.replace:
            old = self.target.with_name(f".{self.target.name}.old-{_writer()}")
            self.target.rename(old)
            self.tmp.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                self.tmp.rename(self.target)
            except OSError:  # someone else (another rank, another run) finished the same folder first
                shutil.rmtree(self.tmp, ignore_errors=True)
                if not self.target.is_dir():
                    raise


def remove_stale_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """Remove the staging folders (`.<name>.tmp-<pid>@<host>-*`, and `.<name>.old-<pid>@<host>` of a
    replace) that killed writers of this machine left in `folder`: those whose process no longer
    runs. A folder another machine is writing (a prepared cache on a shared disk) is left alone:
    its pid means nothing here. A name without a host is read as this machine's (earlier builds
    wrote none)."""
    removed = []
    for pattern, kind in ((f".{name}.tmp-*-*", ".tmp-"), (f".{name}.old-*", ".old-")):
        for path in folder.glob(pattern):
            writer = path.name.rsplit(kind, 1)[-1]
            writer = writer.rsplit("-", 1)[0] if kind == ".tmp-" else writer  # mkdtemp's suffix has no "-"
            pid, _, host = writer.partition("@")
            if host and host != _host():
                continue
            if path.is_dir() and pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _writer() -> str:
    """`<pid>@<host>`: who writes a staging folder, as remove_stale_temporaries reads it back."""
    return f"{os.getpid()}@{_host()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no pid can be
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _host() -> str:
    # Only characters that are safe in a file name, and no "-": the name's fields are split on it.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def share_files(folder: Path) -> None:
    """Give every file the mode any new file would have: some writers (safetensors) make theirs
    owner-only, and a team could not load the weights of a merged model or an adapter."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest existing parent (both resolved): where a folder not
    yet made will go."""
    path = path.resolve()
    return next(p for p in [path, *path.parents] if p.exists())


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path)).free


def can_create_in(folder: Path) -> bool:
    """Whether a new entry can be made in `folder`: tried, not guessed from mode bits (root,
    read-only mounts and /proc all answer differently than the bits say)."""
    probe = folder / f".qlora-write-test-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return False
    return True


def write_failure(err: OSError, path: Path, needed: int, where: str) -> UserError:
    """The user's error for a write that failed (the caller has removed what it wrote)."""
    return disk_full(err, path, needed, where=where) or UserError(f"cannot write {path}: {err.strerror or err}",
                                                            where=where, fix="choose a place you can write")


def disk_full(err: BaseException, path: Path, needed: int, *, where: str | None = None,
              key: str | None = None) -> UserError | None:
    """If `err` came from a full disk (ENOSPC, or less space left than the write needs: torch's
    writer reports no errno), the user's error saying how much it needs and how much there is
    (at `where`, or the recipe `key` that named the path)."""
    folder = nearest_existing(path.parent)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if not _says_disk_full(err) and free >= needed:
        return None
    if not needed:  # nothing to measure the write by
        return UserError(f"no space left to write {path}: {folder} has {_size(free)} free", where=where, key=key,
                         fix="free space there, or write to another disk")
    if free >= needed:  # the write filled the disk anyway, then its partial file was removed
        return UserError(f"no space left to write {path}: the disk filled while writing it, which takes more than "
                         f"the {_size(needed)} estimated ({folder} has {_size(free)} free again)", where=where, key=key,
                         fix=f"free more than {_size(needed)} there, or write to another disk")
    return UserError(f"no space left to write {path}: it needs about {_size(needed)}, and {folder} has "
                     f"{_size(free)} free", where=where, key=key,
                     fix=f"free at least {_size(needed - free)} there, or write to another disk")


def _says_disk_full(err: BaseException) -> bool:
    """ENOSPC or EDQUOT, as an OSError's errno or only in the text: the tokenizers library raises a
    bare `Exception("No space left on device (os error 28)")`."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return getattr(err, "errno", None) in codes or any(os.strerror(code) in str(err) for code in codes)


def size_text(count: int) -> str:
    """A byte count as a person reads it: `512 bytes`, `3.4 MiB`, `12.0 GiB`."""
    return _size(count)


def folder_size(folder: Path) -> int:
    """Bytes in the files under `folder` (0 if there is none)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} bytes"


def cache_root() -> Path:
    """Where built models and converted tokenizers are kept: $QLORA_CACHE or ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora")


# ---------------------------------------------------------------- what qlora made

MARKER = "qlora"  # the field of a JSON file, or the tag of a model card, that says qlora made a folder
CARD = "README.md"  # a model folder's card (huggingface_hub.ModelCard), where its marker is


def marker(kind: str) -> dict:
    """`{"qlora": {"kind": kind, "version": ...}}`: merge it into the JSON file a folder of that
    kind keeps (a run's run.json, prepared data's qlora_prepared.json), so qlora can tell the
    folder from one a user made."""
    from importlib import metadata

    return {MARKER: {"kind": kind, "version": metadata.version("qlora-cli")}}


def model_card(kind: str, base_model: str | None, text: str, *, library_name: str, tags: tuple[str, ...] = ()):
    """The model card (`huggingface_hub.ModelCard`) of a model folder qlora writes (an adapter, a
    merged model): `text` under front matter naming the base model when it is a hub id and tagged
    `qlora` and `kind`, the marker `has_marker` reads back. Save it as the folder's README.md."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=hub_id(base_model), library_name=library_name, tags=[MARKER, kind, *tags])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def hub_id(name: str | None) -> str | None:
    """`name` when it names a hub repository, else None. The hub reads a card's `base_model` as a
    repository to link; a local folder (the user's own, or the cache folder a model built from its
    config lives in) is none, and its path would show the machine's home folder to whoever reads the card."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name is None or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def has_marker(path: Path, kind: str) -> bool:
    """Whether `path` holds qlora's marker for a folder of `kind`: a JSON file with `marker`'s
    field, or a model card (README.md) that `model_card` tagged. A model card from before
    `model_card` (front matter `tags: [qlora, merged]`) reads the same."""
    if path.name == CARD:
        return {MARKER, kind} <= set(_card_tags(path))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get(MARKER), dict) and data[MARKER].get("kind") == kind


def _card_tags(path: Path) -> list[str]:
    import yaml
    from huggingface_hub import ModelCard

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # none, or not UTF-8: not a card qlora wrote
        return []
    if not text.startswith("---"):  # no front matter (ModelCard would log that it found none)
        return []
    try:
        tags = ModelCard(text).data.tags
    except (ValueError, TypeError, yaml.YAMLError):  # front matter that is not YAML, or not a card's
        return []
    return [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else []


CHECKSUMS = "qlora_checksums.json"  # beside the weights of a folder qlora wrote: each file's size and sha256


def write_checksums(folder: Path, *, made_from: Path | None = None) -> None:
    """Record the size and sha256 of each weights file in `folder` (before it is renamed into
    place), so a later load can tell bytes changed on disk from the weights that were written;
    `made_from`: the folder whose weights these were made from (a merge's adapter), by digest."""
    files = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(folder.glob("*.safetensors"))}
    record = {"files": files} | ({"made_from": weights_digest(made_from)} if made_from else {})
    (folder / CHECKSUMS).write_text(json.dumps(record, indent=1) + "\n")


def weights_digest(folder: Path) -> str:
    """One sha256 over the weights files of `folder` (their recorded sha256s where recorded)."""
    import hashlib

    recorded = _recorded_checksums(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(f"{path.name}:{recorded.get(path.name, {}).get('sha256') or _sha256(path)}\n".encode())
    return digest.hexdigest()


def made_from(folder: Path, source: Path) -> bool:
    """Whether the weights in `folder` were made from `source`'s weights as they are now (a merged
    model from the adapter it is asked for, not from one an earlier run or `merge.adapter` left)."""
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text()).get("made_from")
    except (OSError, ValueError, AttributeError):
        return False
    return source.is_dir() and recorded == weights_digest(source)


def weights_damage(folder: Path, required: tuple[str, ...] = (), *, contents: bool = True) -> str | None:
    """Why the weights in `folder` cannot be what was written (a `required` file missing, a file
    empty or cut short, a shard its index names missing, a header safetensors cannot read, a size
    or, with `contents`, a sha256 other than the one recorded beside them), or None.
    Merged models are checked by size and header only: hashing gigabytes at every load costs more
    than the flipped bit it would find."""
    from safetensors import SafetensorError, safe_open

    for name in required:
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is cut short or corrupt"
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            return f"{folder / missing[0]} is missing (its index {index.name} names it)"
    recorded = _recorded_checksums(folder)
    for path in sorted(folder.glob("*.safetensors")):
        expected = recorded.get(path.name, {})
        if path.stat().st_size == 0:
            return f"{path} is empty"
        if expected.get("bytes") not in (None, path.stat().st_size):
            return f"{path} holds {path.stat().st_size} bytes; {expected['bytes']} were written"
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{path} is cut short or corrupt ({err})"
        if contents and expected.get("sha256") not in (None, _sha256(path)):
            return f"{path} is not what was written: its sha256 differs from the one in {CHECKSUMS}"
    return None


def _recorded_checksums(folder: Path) -> dict:
    try:
        files = json.loads((folder / CHECKSUMS).read_text()).get("files")
    except (OSError, ValueError, AttributeError):  # none (written before checksums were), or damaged itself
        return {}
    return files if isinstance(files, dict) else {}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


LOCK_FILE = ".qlora.lock"  # in the folder it guards; it says which process holds it


def lock_folder(folder: Path, command: str, key: str | None = None):
    """Hold `folder` for this process until `release_folder` (or the process ends, however it
    ends: the operating system lets go of it). A second holder is refused, exit 2,
    with the pid and host of the first (and the recipe `key` that named the folder)."""
    return _lock(folder, folder / LOCK_FILE, command, key)


def lock_output_file(output: Path, command: str):
    """Hold the file `output` as `lock_folder` holds a folder (its lock file `.NAME.qlora.lock`
    lies beside it, and is gone once `release_folder` lets go): two commands writing one output
    would interleave their lines."""
    path = output.parent / f".{output.name}{LOCK_FILE}"
    try:
        return _lock(output, path, command, None, "file")
    except OSError as err:  # a full disk: the lock's line cannot be written
        raise write_failure(err, path, 256, where="--output") from None


def _lock(target: Path, path: Path, command: str, key: str | None, what: str = "folder"):
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=0)
    try:
        _acquire(lock, path.parent)
    except Timeout:
        raise _in_use(target, path, command, key, what) from None
    # filelock (>= 4) leaves what a holder wrote in place while others try: this is what they read.
    try:
        path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}) + "\n")
    except OSError:
        release_folder(lock)
        raise
    return lock


def _acquire(lock, folder: Path) -> None:
    for attempt in range(3):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
            return
        except FileNotFoundError:  # a run that just let go removed the folder it left empty
            if attempt == 2:
                raise


def release_folder(lock) -> None:
    """Let go of a folder `lock_folder` took, leaving no lock file behind.

    The file is removed while the lock is still held, then released: this order, not the reverse.
    A process that opened the file before it was removed and gets the lock after finds a file
    with no name (link count 0) and filelock makes it try again on the file at the path. Released
    first and removed after, a process could take the lock between the two, lose its file to our
    removal, and a third would lock a new file beside it: two holders at work in one folder. Here
    a new holder can only start once this one has finished everything the lock guarded."""
    Path(lock.lock_file).unlink(missing_ok=True)
    lock.release()


def check_not_in_use(folder: Path, command: str, key: str | None = None) -> None:
    """Refuse now, before any work, a folder that another process holds (it is not taken here)."""
    if (folder / LOCK_FILE).is_file():
        release_folder(lock_folder(folder, command, key))


def _in_use(target: Path, path: Path, command: str, key: str | None, what: str) -> UserError:
    try:
        holder = json.loads(path.read_text())
        who = f"pid {holder['pid']} on {holder['host']} ({holder.get('command', 'qlora')})"
    except (OSError, ValueError, KeyError, TypeError):
        who = "another process"
    return UserError(f"{target} is in use by {who}", key=key,
                     fix=f"wait until it ends (or stop it), or give this {command} another {what}")
