"""Folders that appear whole or not at all: written beside the target, renamed when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class atomic_folder:
    """`with atomic_folder(target) as tmp:` writes into a temporary folder beside `target` and
    renames it into place only when the block completes; on error nothing is left behind."""

    def __init__(self, target: Path, replace: bool = False):
        self.target, self.replace = Path(target), replace

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # The pid in the name tells a later run whether the writer is still alive (remove_stale_temporaries).
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-{os.getpid()}-", dir=self.target.parent))
        # mkdtemp makes an owner-only folder; what we keep is shared as any new folder would be.
        self.tmp.chmod(0o777 & ~current_umask())
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        share_files(self.tmp)
        if self.target.exists() and self.replace:
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
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


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary folders that killed writers of `target` left beside it: those whose
    process no longer runs. Only for what one process on this machine writes (a merge): a rank
    on another machine has a pid this one cannot see."""
    removed = []
    for path in target.parent.glob(f".{target.name}.tmp-*-*"):
        pid = path.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no pid can be
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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


def cache_root() -> Path:
    """Where built models and converted tokenizers are kept: $QLORA_CACHE or ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora")
