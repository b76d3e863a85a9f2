"""The Hugging Face Hub: whether it can be reached now, and the published architectures of the
checkpoints the shipped recipes name, so that `qlora plan` answers before anything is downloaded.

Offline, huggingface_hub retries each request for about a minute (two dozen lines of retries)
before transformers gives up; a hub that cannot be reached turns this process offline instead:
what is cached still loads, anything else fails at once, and the error says why.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from qlora_cli.atomic import hub_id

PROBE_SECONDS = 3.0
_found: dict[str, str | None] = {}

# The checkpoints the shipped recipes name -> their config.json's architecture values and the
# mistral-common tokenizer of the same vocabulary (bench/family_plans.py reads them from here).
_TEXT_24B = {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 131072, "rope_theta": 1.0e9, "sliding_window": None}
_PIXTRAL = {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "head_dim": 64, "patch_size": 14, "image_size": 1540, "hidden_act": "silu"}
_MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
               "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32000, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": False}
PUBLISHED: dict[str, tuple[dict, str]] = {
    "mistralai/Mistral-7B-Instruct-v0.1": (_MISTRAL_7B, "mistral-common:v1"),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (
        {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
         "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rope_theta": 1.0e6}, "mistral-common:v1"),
    "mistralai/Mistral-Nemo-Instruct-2407": (
        {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 14336, "num_hidden_layers": 40,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 1024000,
         "rope_theta": 1.0e6, "sliding_window": None}, "mistral-common:tekken_240718"),
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506": (
        {"model_type": "mistral3", "text_config": _TEXT_24B, "vision_config": _PIXTRAL},
        "mistral-common:tekken_240911"),
}


def unreachable() -> str | None:
    """Why the hub cannot be asked now (HF_HUB_OFFLINE, or no connection to its host within a few
    seconds), or None. Found unreachable, this process goes offline (see the module's docstring).
    Asked once per process."""
    if "reason" not in _found:
        _found["reason"] = _probe()
        if _found["reason"] and not _offline_set():
            _go_offline()
    return _found["reason"]


def _offline_set() -> str | None:
    """The variable that says offline, if one does."""
    return next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")), None)


def _probe() -> str | None:
    said = _offline_set()
    if said:
        return f"{said} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    via = _proxy(endpoint.scheme, host)  # behind a proxy, the hub is reached through it, not directly
    if via:
        host, port = via.hostname or host, via.port or (443 if via.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as err:
        return f"{host} {'(the proxy) ' if via else ''}cannot be reached ({err.strerror or err})"
    return None


def _proxy(scheme: str, host: str):
    """The proxy the environment names for `scheme` (as requests reads HTTPS_PROXY, ALL_PROXY,
    NO_PROXY), parsed, or None."""
    from urllib.request import getproxies, proxy_bypass

    proxies = getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or proxy_bypass(host):
        return None
    return urlparse(proxy if "://" in proxy else f"http://{proxy}")


def _go_offline() -> None:
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes this one starts (--nproc workers)
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at import; huggingface_hub asks this one


def is_hub_id(name: str | None) -> bool:
    """`name` names a hub repository: not a local path, not a mistral-common tokenizer (":" is no
    repo id's), and a repo id by huggingface_hub's own rules (`atomic.hub_id`, the one rule)."""
    from pathlib import Path

    return bool(name) and not Path(name).expanduser().exists() and hub_id(name) is not None


HUB_KERNELS = "QLORA_HUB_KERNELS"  # =1: let bitsandbytes fetch its CPU kernel from the hub


def keep_hub_kernels_off() -> None:
    """Unless QLORA_HUB_KERNELS=1, bitsandbytes cannot import the `kernels` package.

    bitsandbytes' CPU backend, when it is imported on a CPU with AVX512-BF16 and `kernels` is
    installed, downloads kernels-community/quantization-bitsandbytes from the hub and runs it,
    whatever `model.trust_remote_code` says (offline it prints "Skipping publisher trust check").
    With its `from kernels import ...` failing, it keeps its own kernel, and its warning about the
    fallback is silenced. Only imports made by bitsandbytes' modules are refused: transformers'
    hub kernels (`model.attn_implementation: kernels-community/...`) are the user's choice.
    """
    import builtins
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if os.environ.get(HUB_KERNELS, "") == "1" or getattr(builtins.__import__, "keeps_hub_kernels_off", False):
        return
    original = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] == "kernels" and globals is not None \
                and str(globals.get("__name__", "")).split(".")[0] == "bitsandbytes":
            raise ImportError(f"qlora keeps bitsandbytes off hub kernels ({HUB_KERNELS}=1 lets it fetch them)",
                              name=name)
        return original(name, globals, locals, fromlist, level)

    guarded_import.keeps_hub_kernels_off = True
    builtins.__import__ = guarded_import
