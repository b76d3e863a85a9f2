"""A resolved recipe written out as YAML: what recipe.yaml, the model card and `qlora config show`
hold. The text reads back as the same recipe (strings that look like numbers stay strings), and a
value that came from the environment keeps its `${oc.env:NAME}`, so a secret never lands in a file.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf


def to_yaml(config: dict[str, Any]) -> str:
    """YAML text that is a valid recipe again (`qlora config show r.yaml > resolved.yaml`)."""
    return yaml.dump(config, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


class _RecipeDumper(yaml.SafeDumper):
    """Quotes strings that OmegaConf would read back as numbers: PyYAML writes "1e-4" bare,
    since YAML 1.1 wants a dot in a float, but OmegaConf reads 1e-4 as a float."""


# Digits with an optional dot and exponent, or .inf/.nan: every float form OmegaConf accepts.
_NUMBER_LIKE = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?|[-+]?\.(inf|nan)", re.IGNORECASE)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if _NUMBER_LIKE.fullmatch(value) else None
    # A resolved value's `${` is literal (the recipe wrote `\${`): escaped again, or reading the
    # output back would interpolate it.
    value = value.replace("${", "\\${")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class _AsWritten(str):
    """A value written out as the recipe wrote it (`${oc.env:NAME}`), not as it resolved."""


_RecipeDumper.add_representer(str, _represent_str)
_RecipeDumper.add_representer(
    _AsWritten, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", str(value)))


def environment_keys(config: DictConfig, resolved: dict[str, Any]) -> dict[str, str]:
    """Keys (dotted) whose value comes from an environment variable (`${oc.env:NAME}`, or a `${key}`
    that resolves to one), with their text as written: what qlora writes instead of the value, so
    a token or secret passed through the environment never lands in a file."""
    written = _leaves(OmegaConf.to_container(config, resolve=False))
    values = {key: str(value) for key, value in _leaves(resolved).items()}
    direct = [key for key, text in written.items() if isinstance(text, str) and "oc.env:" in text]
    secrets = [values[key] for key in direct if values.get(key)]
    return {key: text for key, text in written.items() if isinstance(text, str) and "${" in text
            and (key in direct or any(secret in values.get(key, "") for secret in secrets))}


def _leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return {prefix.rstrip("."): config}
    return {k: v for key, value in items for k, v in _leaves(value, f"{prefix}{key}.").items()}


def as_written(resolved: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """A copy of `resolved` with each of `keys` set back to its text as written."""
    config = copy.deepcopy(resolved)
    for key, text in keys.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
        if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
            node[int(leaf)] = _AsWritten(text)
        elif isinstance(node, dict) and leaf in node:
            node[leaf] = _AsWritten(text)
    return config
