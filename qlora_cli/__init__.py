"""qlora: fine-tune Mistral-family language models with QLoRA, driven by YAML recipes."""

import logging

__version__ = "0.1.0"

# bitsandbytes warns on every CPU import that an optional hub kernel (which needs the network)
# is missing; it falls back to its own kernel, so the message only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
