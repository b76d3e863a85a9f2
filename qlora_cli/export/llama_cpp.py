"""llama.cpp, found: its engine (llama-cpp-python), its converter and its quantizer.

The engine and the quantizer come from the installed `llama-cpp-python` (the `gguf` extra builds
llama.cpp from source). Its wheel does not install llama.cpp's converter (`convert_hf_to_gguf.py`,
its `conversion/` package and `gguf-py`), so the converter comes from, in this order:

1. a llama.cpp checkout named by `--llama-cpp DIR` or `$QLORA_LLAMA_CPP`;
2. the converter of the very llama.cpp the engine was built from: the `llama-cpp-python` source
   distribution of the installed version, which pip fetches once (about 76 MB; pip's own cache
   serves it again when pip built the extra) and qlora keeps in `$QLORA_CACHE/llama.cpp/VERSION/`.

The second keeps converter, quantizer and engine of one llama.cpp commit: a GGUF the converter
writes is one the engine that checks it was built to read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qlora_cli.atomic import atomic_folder, cache_root
from qlora_cli.errors import UserError

EXTRA = "pip install 'qlora-cli[gguf]' (from a checkout: pip install '.[gguf]'; builds llama.cpp: up to an hour on 2 cores)"
ENVIRONMENT = "QLORA_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs of a llama.cpp tree (newer trees split the script into conversion/).
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py")
# The converter writes these itself; every other type is llama.cpp's quantizer's.
CONVERTER_TYPES = ("f32", "f16", "bf16")
# Types llama.cpp refuses to make without an importance matrix (llama-quantize says so too).
NEEDS_IMATRIX = ("iq1_", "iq2_", "q2_k_s")


def engine():
    """The `llama_cpp` module, or a UserError naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise UserError(f"llama.cpp is not installed ({err})", fix=EXTRA) from None
    return llama_cpp


def quant_types() -> dict[str, int]:
    """Every type a GGUF can be written in: the converter's, and the quantizer's own `LLAMA_FTYPE_MOSTLY_*`
    that need no importance matrix, asked of the installed llama.cpp (name -> ftype; the converter's: -1)."""
    llama_cpp = engine()
    types = {name: -1 for name in CONVERTER_TYPES}
    for attribute in dir(llama_cpp):
        if attribute.startswith("LLAMA_FTYPE_MOSTLY_"):
            name = attribute[len("LLAMA_FTYPE_MOSTLY_"):].lower()
            if name not in types and not name.startswith(NEEDS_IMATRIX):
                types[name] = getattr(llama_cpp, attribute)
    return types


def check_types(requested: list[str]) -> list[str]:
    """The requested types, lower-cased, each one llama.cpp can write; a UserError listing them else."""
    known = quant_types()
    wanted = [name.strip().lower() for name in requested if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UserError(f"unknown GGUF type{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                        key="--quant", fix=f"use one or more of: {', '.join(known)}")
    return list(dict.fromkeys(wanted))


def converter_dir(checkout: str | Path | None = None) -> Path:
    """The llama.cpp tree whose converter qlora runs (see the module docstring for the order)."""
    named = checkout or os.environ.get(ENVIRONMENT)
    if named:
        folder = Path(named).expanduser()
        missing = [part for part in (CONVERTER, "gguf-py") if not (folder / part).exists()]  # older trees lack conversion/
        if missing:
            source = "--llama-cpp" if checkout else f"${ENVIRONMENT}"
            raise UserError(f"{source} names {folder}, which has no {', '.join(missing)}", key=source,
                            fix="name a llama.cpp checkout (git clone https://github.com/ggml-org/llama.cpp)")
        return folder
    version = engine().__version__
    folder = cache_root() / "llama.cpp" / version
    if not (folder / CONVERTER).is_file():
        _fetch_converter(version, folder)
    return folder


def _fetch_converter(version: str, folder: Path) -> None:
    """llama.cpp's converter out of the llama-cpp-python sdist of `version`, which pip downloads."""
    with tempfile.TemporaryDirectory() as download:
        done = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                               "--no-binary", ":all:", "-d", download, "-q"],
                              capture_output=True, text=True)
        archives = list(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not archives:
            raise UserError(f"cannot fetch llama.cpp's converter (the llama-cpp-python {version} source): "
                            f"{(done.stderr or done.stdout).strip()[-400:]}", key="--llama-cpp",
                            fix=f"run once with network access, or name a llama.cpp checkout with --llama-cpp DIR "
                                f"or ${ENVIRONMENT}")
        with tarfile.open(archives[0]) as archive, atomic_folder(folder) as work:
            root = archive.getnames()[0].split("/")[0]
            prefix = f"{root}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(work, members=members, filter="data")


def convert(model_dir: Path, outfile: Path, outtype: str, llama_cpp_dir: Path, *, mmproj: bool = False,
            vocab_only: bool = False) -> None:
    """llama.cpp's own converter on a transformers folder: a GGUF of `outtype` (f32, f16, bf16)."""
    command = [sys.executable, str(llama_cpp_dir / CONVERTER), str(model_dir), "--outfile", str(outfile),
               "--outtype", outtype, *(["--mmproj"] if mmproj else []), *(["--vocab-only"] if vocab_only else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise ConversionFailed(f"llama.cpp's converter failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-1500:]}")


class ConversionFailed(Exception):
    """llama.cpp's converter refused a model qlora wrote: a bug or an unsupported model (exit 1)."""


def quantize(source: Path, target: Path, name: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`, what llama-quantize runs) from `source`."""
    llama_cpp = engine()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[name]
    params.nthread = threads or os.cpu_count() or 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # its per-tensor log goes to the C stderr
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise ConversionFailed(f"llama.cpp's quantizer failed to write {name} from {source.name}")
