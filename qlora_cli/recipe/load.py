"""Recipe files + overrides -> one resolved, validated `Recipe`.

Recipes are YAML files merged in order with OmegaConf. A file may say `extends: X` or
`extends: [X, Y]` (paths relative to it, or names on the search path); `a.b=value` overrides
are YAML-typed and `~a.b` deletes a key. Every leaf remembers where it was set (file:line or
`override`) so that errors and `qlora config explain` can point at it.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_cli.errors import UserError, combined, locating
from qlora_cli.recipe.sections import DataSection, EvalSection, GenerateSection, MergeSection, ModelSection
from qlora_cli.recipe.written import as_written, environment_keys, to_yaml

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainingArguments

    from qlora_cli.rewards import RewardSection

SECTIONS = ("model", "quantization", "lora", "data", "training", "merge", "generate", "eval", "rewards")
TOP_LEVEL_KEYS = ("method",)  # keys that are no section: the objective, one of sections.METHODS
RECIPE_PATH_VARIABLE = "QLORA_RECIPE_PATH"
OVERRIDE = "override"

# Keys whose relative values name files: looked up next to the recipe that sets them first,
# so a shared recipe finds its data wherever it is run from; else left relative to the cwd.
_FILE_KEYS = {"path"}
_FILE_KEY_PARENTS = ("data.sources", "data.validation_sources")
REWARD_FILE = re.compile(r"(?P<path>.+\.py):(?P<name>\w+)")  # `rewards[].function: path/to/file.py:name`
# Keys whose values name files or folders: a leading `~` is the user's home, as in a shell (which
# leaves `key=~/x` alone). TrainingArguments expands it in output_dir; every path must agree.
_HOME_KEYS = ("model.name_or_path", "model.tokenizer", "model.adapter", "data.prepared_dir", "merge.output_dir", "merge.adapter",
              "generate.input", "generate.output", "training.output_dir", "training.logging_dir",
              "eval.input")


@dataclass
class RawRecipe:
    """Merged recipe before validation: the config, where each leaf came from, and the files."""

    config: DictConfig
    origins: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def recipe_search_path() -> list[Path]:
    """Folders searched for recipe names: the package's own recipes, then $QLORA_RECIPE_PATH."""
    folders = [_package_recipes()]
    extra = os.environ.get(RECIPE_PATH_VARIABLE, "")
    folders += [Path(p).expanduser() for p in extra.split(os.pathsep) if p]
    return folders


def _package_recipes() -> Path:
    # Installed wheels carry the recipes inside the package; a source checkout keeps them at
    # the repository root beside the package.
    packaged = Path(str(resources.files("qlora_cli"))) / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


def find_recipe(name: str, relative_to: Path | None = None, extending: tuple[Path, ...] = ()) -> Path:
    """Turn a recipe argument (a path, or a name on the search path) into an existing file; an
    `extends` name finds the file of that name beside the recipe (`relative_to`) first, unless that
    is a file being extended (a team's mistral7b.yaml that extends the shipped mistral7b)."""
    path = Path(name).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path  # an `extends` path is relative to the file that says it, never the cwd
    candidates = [path, path / "recipe.yaml"]  # a run folder
    if relative_to is not None and not path.suffix:
        siblings = [path.with_name(f"{path.name}.yaml"), path.with_name(f"{path.name}.yml")]
        candidates += [sibling for sibling in siblings if sibling.resolve() not in extending]
    if not Path(name).is_absolute():
        for folder in recipe_search_path():
            candidates += [folder / name, folder / f"{name}.yaml", folder / f"{name}.yml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    searched = "\n".join(f"    {folder}" for folder in recipe_search_path())
    fix = f"give a path to a YAML file, or add its folder to ${RECIPE_PATH_VARIABLE}"
    if any(mark in name for mark in "{}[],"):  # the shell split an override at its spaces
        fix = "quote an override that holds spaces as one argument: 'data.sources=[{path: my.jsonl}]'"
    raise UserError(
        f"recipe `{name}` not found: it is neither a file nor a recipe name on the search path:\n{searched}",
        fix=fix,
    )


def load_raw_recipe(recipe_args: list[str], overrides: list[str]) -> RawRecipe:
    """Merge the recipe files (with their `extends`) in order, then apply the overrides."""
    if not recipe_args:
        raise UserError("no recipe given", fix="name a recipe, e.g. `qlora config show tiny-mistral`")
    raw = RawRecipe(OmegaConf.create({}))
    for arg in recipe_args:
        _merge_file(raw, find_recipe(arg), stack=[])
    for override in overrides:
        _apply_override(raw, override)
    return raw


def _merge_file(raw: RawRecipe, path: Path, stack: list[Path]) -> None:
    if path in stack:
        cycle = " -> ".join(str(p) for p in [*stack[stack.index(path):], path])
        raise UserError(f"`extends` forms a cycle: {cycle}", fix="remove one of these `extends` entries")
    text = _read_text(path)
    config, lines = _parse_yaml(text, path)
    for index, parent in enumerate(_parents(config.pop("extends", None), _where(path, lines, "extends"))):
        try:
            found = find_recipe(parent, relative_to=path.parent, extending=(*stack, path))
        except UserError as err:  # say which file asked for it, and where
            raise UserError(err.message, where=_where(path, lines, f"extends.{index}"), fix=err.fix) from None
        _merge_file(raw, found, [*stack, path])
    _resolve_file_keys(config, path.parent)
    earlier = dict(raw.origins)
    _record_origins(raw.origins, config, lambda key: _where(path, lines, key))
    try:
        raw.config = OmegaConf.merge(raw.config, config)
    except TypeError:  # "Cannot merge incompatible container types", without saying where
        key = _merge_conflict(raw.config, config)
        if key is None:
            raise
        kind = "a mapping" if isinstance(OmegaConf.select(config, key), DictConfig) else "a list"
        other = "a list" if kind == "a mapping" else "a mapping"
        raise UserError(f"`{key}` is {kind} here but {other} in {earlier.get(key, 'an earlier recipe')}, "
                        "and one cannot be merged into the other", where=_where(path, lines, key),
                        fix="write it in the same shape as the recipe it extends (a section is a mapping of keys)") from None
    raw.files.append(path)


def _merge_conflict(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first key that is a mapping on one side and a list on the other (plain containers,
    values as written: reading a config's child node by its key would resolve an interpolation)."""
    if isinstance(old, DictConfig):
        old, new = (OmegaConf.to_container(c, resolve=False) for c in (old, new))
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None
    for key in new:
        if key not in old:
            continue
        before, after, dotted = old[key], new[key], f"{prefix}{key}"
        if {type(before), type(after)} == {dict, list}:
            return dotted
        if found := _merge_conflict(before, after, f"{dotted}."):
            return found
    return None


def _parents(extends: Any, where: str) -> list[str]:
    """The recipes an `extends` value names: one name, or a list of names (a number or a mapping
    would otherwise be iterated, or fail to be, as if it were a list)."""
    parents = [extends] if isinstance(extends, str) else [] if extends is None else extends
    if not isinstance(parents, (list, ListConfig)) or not all(isinstance(p, str) for p in parents):
        raise UserError(f"`extends` must be a recipe name or a list of them, not {_shown(extends)}", where=where,
                        fix="write e.g. `extends: tiny-mistral` or `extends: [base.yaml, lora-wide]`")
    return list(parents)


def _shown(value: Any) -> str:
    return repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"recipe is not UTF-8 text ({err.reason})", where=str(path)) from None


def _parse_yaml(text: str, path: Path) -> tuple[DictConfig, dict[str, int]]:
    """The file's config, and the line of every key in it (dotted path -> 1-based line)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        config = OmegaConf.create(text) if node is not None else OmegaConf.create({})
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"not valid YAML: {getattr(err, 'problem', err)}", where=where) from None
    except RecursionError:  # lists or mappings nested thousands deep: no recipe is
        raise UserError("the YAML nests too deep to be a recipe", where=str(path),
                        fix="write sections of keys and values (model:, lora:, ...)") from None
    except OmegaConfBaseException as err:  # e.g. an unclosed `${`, which OmegaConf parses on load
        lines = _lines_of(node)
        raise UserError(f"`{err.full_key}` cannot be parsed: {_reason(err)}", where=_where(path, lines, err.full_key or ""),
                        fix="close each `${...}`, or write `\\${` for a literal `${`") from None
    if not isinstance(config, DictConfig):
        raise UserError("a recipe must be a mapping of sections (model:, lora:, ...)", where=str(path))
    return config, _lines_of(node)


def _reason(err: OmegaConfBaseException) -> str:
    """OmegaConf's message without the `full_key:`/`object_type=` lines it appends for debugging."""
    return str(getattr(err, "msg", None) or err).splitlines()[0]


def _lines_of(node: Any) -> dict[str, int]:
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return lines


def _collect_lines(node: Any, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, f"{key}.", lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = f"{prefix}{index}"
            lines[key] = item.start_mark.line + 1
            _collect_lines(item, f"{key}.", lines)


def _where(path: Path, lines: dict[str, int], key: str) -> str:
    while key and key not in lines:
        key = key.rpartition(".")[0]
    shown = display_path(path)
    return f"{shown}:{lines[key]}" if key else shown


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _resolve_file_keys(config: DictConfig, folder: Path) -> None:
    for parent_key in _FILE_KEY_PARENTS:
        entries = OmegaConf.select(config, parent_key, default=None)
        if not isinstance(entries, ListConfig):
            continue
        for entry in entries:
            if not isinstance(entry, DictConfig):
                continue
            written = OmegaConf.to_container(entry, resolve=False)  # `${...}` as written, not resolved
            for key in _FILE_KEYS & set(written):
                value = written[key]
                if isinstance(value, str) and "${" not in value and not Path(value).is_absolute():
                    beside = (folder / value).resolve()
                    if beside.exists():
                        entry[key] = str(beside)
    for entry in OmegaConf.select(config, "rewards", default=None) or []:
        written = OmegaConf.to_container(entry, resolve=False) if isinstance(entry, DictConfig) else {}
        found = REWARD_FILE.fullmatch(str(written.get("function", "")))
        if found and "${" not in found["path"] and not Path(found["path"]).is_absolute():
            beside = (folder / found["path"]).resolve()
            if beside.exists():
                entry["function"] = f"{beside}:{found['name']}"


def _record_origins(origins: dict[str, str], config: Any, origin_of) -> None:
    """Point every key set by this layer at its origin; a list, a value or null replaces the old
    one whole (`quantization=null`), so the keys that were inside it have no origin left."""
    for key, replaces in _walk(config):
        if replaces:
            for old in [k for k in origins if k.startswith(f"{key}.")]:
                del origins[old]
        origins[key] = origin_of(key)


def _walk(config: Any, prefix: str = ""):
    """Yield (dotted key, replaces) for every node of a config, each mapping before its keys;
    `replaces`: the node is no mapping, so merging it replaces what was there."""
    items = config.items_ex(resolve=False) if isinstance(config, DictConfig) else enumerate(config)
    for key, value in items:
        dotted = f"{prefix}{key}"
        yield dotted, not isinstance(value, DictConfig)
        if isinstance(value, (DictConfig, ListConfig)):
            yield from _walk(value, f"{dotted}.")


def _apply_override(raw: RawRecipe, override: str) -> None:
    key, sep, value = override.partition("=")
    override = re.sub(r"\[(\d+)\]", r".\1", key) + sep + value  # data.sources[0].x is data.sources.0.x
    if override.startswith("~"):
        _delete_key(raw, override[1:].split("=", 1)[0])
        return
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override `{override}` is not KEY=VALUE", where=OVERRIDE, fix="write e.g. lora.r=8")
    if "" in key.strip().split("."):  # `lora..r`: OmegaConf reads it as a key named `lora.`
        raise UserError(f"override `{override}`: the key `{key.strip()}` has an empty part (a dot too many or at "
                        "an end)", where=OVERRIDE, fix="write each part once, e.g. lora.r=8")
    try:
        layer = OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        reason = _reason(err) if isinstance(err, OmegaConfBaseException) else getattr(err, "problem", None) or str(err)
        raise UserError(f"override `{override}` cannot be parsed: {reason}", where=OVERRIDE,
                        fix="write KEY=VALUE with a YAML value, e.g. lora.target_modules=[q_proj,v_proj]") from None
    _check_list_indices(raw.config, key.strip())
    _record_origins(raw.origins, layer, lambda _key: OVERRIDE)
    # Assign instead of merging so that a list or mapping given on the command line replaces
    # the recipe's value rather than being blended into it.
    OmegaConf.update(raw.config, key.strip(), _unresolved(layer, key.strip()), merge=False, force_add=True)


def _check_list_indices(config: DictConfig, key: str) -> None:
    """Each index in `key` must name an item its list has (OmegaConf says only "list index out
    of range"); a key that does not exist yet is fine, the override adds it."""
    node, parts = OmegaConf.to_container(config, resolve=False), key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            listed = ".".join(parts[:depth])
            if not part.isdigit() or int(part) >= len(node):
                indices = f"use an index from 0 to {len(node) - 1}, or " if len(node) else ""
                raise UserError(f"`{listed}` is a list of {len(node)} item(s), and `{part}` is not an index of it",
                                where=OVERRIDE, fix=f"{indices}give the whole list: {listed}=[...]")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return


def _unresolved(layer: DictConfig, key: str) -> Any:
    # `${...}` in an override points into the whole recipe, not into the one-key layer parsed
    # from it: take the value as written and let `resolve` interpolate it later.
    value = OmegaConf.to_container(layer, resolve=False)
    for part in key.split("."):
        value = value[part]
    return value


def _delete_key(raw: RawRecipe, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(raw.config, parent_key) if parent_key else raw.config
    in_list = isinstance(parent, ListConfig) and leaf.isdigit() and int(leaf) < len(parent)
    if not in_list and (not isinstance(parent, DictConfig) or leaf not in parent):
        raise UserError(f"cannot delete `{key}`: the recipe has no such key", where=OVERRIDE)
    del parent[int(leaf) if in_list else leaf]
    for old in [k for k in raw.origins if k == key or k.startswith(f"{key}.")]:
        del raw.origins[old]


def resolve(raw: RawRecipe) -> dict[str, Any]:
    """The merged config as plain Python data with every `${...}` interpolation resolved."""
    try:
        return OmegaConf.to_container(raw.config, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        raise UserError(f"interpolation failed for `{key}`: {_reason(err)}", key=key or None) from None


@dataclass
class Recipe:
    """A resolved, validated recipe, every section typed: our own sections' dataclasses, and the
    library objects the others become, built once here and on this machine (`training` is the
    method's config class: TrainingArguments, or TRL's DPOConfig / KTOConfig). `written(section)`
    gives a section's keys as the recipe set them, before any default."""

    model: ModelSection
    data: DataSection
    merge: MergeSection
    eval: EvalSection
    generate: GenerateSection
    training: TrainingArguments
    lora: LoraConfig | None  # `lora: null`: no LoRA
    quantization: BitsAndBytesConfig | None  # `quantization: null`: 16/32-bit base weights
    resolved: dict[str, Any]
    origins: dict[str, str]  # dotted key -> the file:line or override that set it (what errors.locating reads)
    files: list[Path]
    from_environment: dict[str, str] = field(default_factory=dict)  # key -> `${oc.env:...}` as written
    method: str = "sft"  # sft | dpo | kto | grpo: which trainer, and which config class `training` is checked against
    rewards: list[RewardSection] = field(default_factory=list)  # method: grpo: what scores its answers, in order

    @property
    def run_dir(self) -> Path:
        return Path(self.training.output_dir)

    def written(self, section: str) -> dict | None:
        """A copy of the keys the recipe set in `section`, resolved but before any library default
        or conversion (qlora's own `training.output_dir` default is in); None for a section it left
        out or set to null. A copy: what a caller changes must not change recipe.yaml."""
        return copy.deepcopy(self.resolved.get(section))

    def as_written(self) -> dict[str, Any]:
        """The recipe as qlora shows it everywhere (recipe.yaml, model card, config show|explain):
        resolved, except values from the environment, which keep their `${oc.env:NAME}`."""
        return as_written(self.resolved, self.from_environment)

    def to_yaml(self) -> str:
        return to_yaml(self.as_written())


def load_recipe(recipe_args: list[str], overrides: list[str] = ()) -> Recipe:
    """Load, merge, resolve and validate a recipe; every problem is reported at once, each at the
    file:line (or override) that set its key."""
    raw = load_raw_recipe(list(recipe_args), list(overrides))
    with locating(raw.origins):
        return _validated(raw)


def _validated(raw: RawRecipe) -> Recipe:
    from qlora_cli.recipe.library_checks import build_library_sections
    from qlora_cli.recipe.model_checks import check_model_objects
    from qlora_cli.recipe.sections import (DataSection, EvalSection, MergeSection, ModelSection, build_schema,
                                           check_finite, check_method, check_values, suggest)

    resolved = resolve(raw)
    expand_home(resolved)
    # `training: null` and `output_dir: null` mean "not set", like leaving the key out.
    if resolved.get("training") is None:
        resolved["training"] = {}
    if isinstance(resolved["training"], dict) and resolved["training"].get("output_dir") is None:
        resolved["training"]["output_dir"] = f"runs/{raw.files[-1].stem}"
    errors = [
        UserError(f"unknown section `{key}`{suggest(key, SECTIONS + TOP_LEVEL_KEYS)}; a recipe has only "
                  f"{', '.join(SECTIONS)} and `method`", key=str(key))
        for key in resolved if key not in SECTIONS + TOP_LEVEL_KEYS
    ]
    typed = {}
    for name, cls in (("model", ModelSection), ("data", DataSection), ("merge", MergeSection), ("eval", EvalSection)):
        try:
            typed[name] = build_schema(cls, resolved.get(name), name)
        except UserError as err:
            errors += err.errors
    non_finite = check_finite(resolved)
    library, library_errors = build_library_sections(resolved, typed.get("data"),
                                                     unbuilt={error.key.split(".")[0] for error in non_finite})
    errors += library_errors
    errors += check_values(typed)
    method = resolved.get("method", "sft")
    errors += check_method(method, typed.get("data"))
    if "model" in typed:
        lora = resolved.get("lora")
        errors += check_model_objects(typed["model"], lora if isinstance(lora, dict) else None)
    rewards, reward_errors = _rewards(resolved.get("rewards"), method)
    errors += reward_errors
    errors = _finite_first(non_finite, errors)
    from_environment = environment_keys(raw.config, resolved)
    if errors:
        raise combined(_redacted(errors, resolved, from_environment))
    return Recipe(
        **typed, **library, resolved=resolved, origins=raw.origins, files=raw.files, from_environment=from_environment,
        method=method, rewards=rewards,
    )


def _redacted(errors: list[UserError], resolved: dict, from_environment: dict[str, str]) -> list[UserError]:
    """The errors with each value that came from the environment (a token, a password) shown as its
    `${oc.env:NAME}` as written: a message is printed, pasted into issues, kept in CI logs."""
    replacements = []
    for key, written in from_environment.items():
        value = _value_at(resolved, key)
        if value is not None and str(value):
            replacements += [(repr(value), written), (repr(str(value)), written)]
            if len(str(value)) >= 4:  # a short value (`8`) would garble the text around it
                replacements.append((str(value), written))
    for error in errors:
        for secret, written in replacements:
            error.message = error.message.replace(secret, written)
            error.fix = error.fix.replace(secret, written) if error.fix else error.fix
    return errors


def _value_at(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(config, dict):
            config = config.get(part)
        elif isinstance(config, list) and part.isdigit() and int(part) < len(config):
            config = config[int(part)]
        else:
            return None
    return config


def _finite_first(non_finite: list[UserError], errors: list[UserError]) -> list[UserError]:
    """A NaN or infinity once, as such: whatever a later check made of the same key (or a library's
    objection that names it, such as GenerationConfig's about `temperature`) says less."""
    keys = {error.key for error in non_finite}
    return non_finite + [error for error in errors if error.key not in keys
                         and not any(f"`{key}`" in error.message for key in keys)]


def _rewards(section, method: str):
    """`method: grpo`'s rewards, typed, with every problem of the section (a reward file that does not
    import, a missing function, a wrong signature)."""
    from qlora_cli.recipe.sections import build_list
    from qlora_cli.rewards import RewardSection, check_rewards

    if section is not None and not isinstance(section, list):
        return [], [UserError("`rewards` must be a list of {function, weight}", key="rewards")]
    rewards, errors = build_list(RewardSection, section or [], "rewards")
    return rewards, errors + (check_rewards(rewards, method) if not errors else [])


def expand_home(resolved: dict) -> None:
    """A leading `~` in each path-valued key becomes the home folder (in place)."""
    data = resolved.get("data") if isinstance(resolved.get("data"), dict) else {}
    places = [(resolved.get(section), key) for section, key in (k.split(".") for k in _HOME_KEYS)]
    places += [(source, "path") for name in _FILE_KEY_PARENTS for source in data.get(name.split(".")[1]) or []]
    for mapping, key in places:
        if isinstance(mapping, dict) and isinstance(mapping.get(key), str) and mapping[key].startswith("~"):
            mapping[key] = os.path.expanduser(mapping[key])
