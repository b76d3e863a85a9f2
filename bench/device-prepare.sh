#!/usr/bin/env bash
# Run HERE (a machine with the project's venv and the package registries), before a session's
# GPU run: gathers into .device-wheels/ (git-ignored) what the GPU machine lacks, about 62 MB of
# the 64 MiB a device call may carry:
#   - wheels: bitsandbytes, datasets, omegaconf (+ antlr4), dill, multiprocess (for Python 3.12),
#     and transformers + peft at the versions this project pins (the machine has transformers
#     5.17, whose TrainingArguments lacks `activation_checkpointing`);
#   - tokenizer-v1/: the mistral-common v1 tokenizer converted to a transformers folder (the
#     machine has no mistral-common).
# Then: device run with carry=[".device-wheels"] and command `bash bench/device.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.device-wheels
rm -rf "$dest" && mkdir -p "$dest"
version() { python -c "from importlib.metadata import version; print(version('$1'))"; }
download() { pip download -q --no-deps -d "$dest" "$@" > /tmp/device-prepare.log 2>&1 \
  || { grep -v WARNING /tmp/device-prepare.log; echo "pip download $* failed"; exit 1; }; }
download "bitsandbytes==$(version bitsandbytes)" "datasets==$(version datasets)" "omegaconf==$(version omegaconf)" \
  'antlr4-python3-runtime==4.9.*' "dill==$(version dill)" "transformers==$(version transformers)" "peft==$(version peft)"
download --python-version 3.12 --only-binary=:all: "multiprocess==$(version multiprocess)"
python - "$dest/tokenizer-v1" <<'EOF'
import sys

from qlora_cli.data.tokenizer import load_tokenizer

load_tokenizer("mistral-common:v1").save_pretrained(sys.argv[1])
EOF
du -sh "$dest"
ls "$dest"
