"""`openmlx serve --config openmlx.yaml`: server settings under their flag names, and a `models:`
list, validated by a JSON Schema made from the `serve` flags themselves (so the file can never
accept a setting the command line doesn't have, or miss one it has). Flags given on the command
line override the file. An unknown key or a wrong type is a start-up error naming the key and its
line.

    port: 8080
    max-queue: 32
    speculative: ngram
    models:
      - source: ./models/my-llama          # a folder: served under its folder name
      - source: mlx-community/Qwen2.5-0.5B-Instruct-4bit   # a Hub id (openmlx pull it, or allow-download)
        id: qwen                           # served as "qwen"
        preload: true                      # loaded at start (at most one)
        temperature: 0.2                   # defaults for requests that set none
        max_tokens: 512
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from engine.config import tool_parsers

# Flags that make no sense in a file (they name the file, or are per-process plumbing).
_NOT_IN_FILE = {"config", "help"}
_MODEL_ENTRY = {
    "type": "object", "additionalProperties": False, "required": ["source"],
    "properties": {
        "source": {"type": "string", "minLength": 1,
                   "description": "a local model folder, or a Hugging Face repo id ORG/NAME"},
        "id": {"type": "string", "minLength": 1, "pattern": "^[^\\s]+$",
               "description": "serve it under this id (default: the folder name or the repo id)"},
        "preload": {"type": "boolean", "description": "load it at start (at most one model)"},
        "max_tokens": {"type": "integer", "minimum": 1,
                       "description": "max_tokens when a request sets none"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2,
                        "description": "temperature when a request sets none"},
        "cpu_dtype": {"enum": ["auto", "keep", "float32", "float16", "quantized"]},
        "chat_template": {"type": "string", "description": "a Jinja chat template file, or the template itself"},
        "draft_model": {"type": "string", "description": "a draft model (folder or id) for speculative decoding"},
        "reasoning_parser": {"enum": ["think", "harmony", "gemma4", "minimax3", "none"],
                             "description": "think: split <think>...</think> from the answer; harmony: gpt-oss's "
                                            "analysis channel; gemma4: Gemma 4's thought channel; none: never "
                                            "(default: found from the chat template)"},
        "tool_parser": {"enum": tool_parsers(),
                        "description": "the model's tool-call format (default: found from the chat template); "
                                       "generic: the generic tool prompt and Hermes calls"},
    },
}


# Settings whose values are never echoed in an error (a key written in the wrong shape is still a key).
_SECRET = {"api-key"}


class ConfigError(Exception):
    """The config file is unreadable or breaks the schema; the message names the key and line."""


def _json_type(action: argparse.Action) -> dict[str, Any]:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return {"type": "boolean"}
    from handlers.commands.settings import FLAG_SCHEMAS

    if action.type in FLAG_SCHEMAS:
        item: dict[str, Any] = dict(FLAG_SCHEMAS[action.type])
    else:
        item = {"type": {int: "integer", float: "number"}.get(action.type, "string")}  # type: ignore[arg-type]
    if action.choices:
        item["enum"] = list(action.choices)
    if isinstance(action, argparse._AppendAction):
        return {"type": "array", "items": item}
    return item


def schema(serve: argparse.ArgumentParser) -> dict[str, Any]:
    """The config file's JSON Schema: one property per `serve` flag (its long name, no dashes
    in front), plus `models`."""
    props: dict[str, Any] = {}
    for action in serve._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in _NOT_IN_FILE or action.help == argparse.SUPPRESS:
            continue
        prop = _json_type(action)
        if action.help:
            prop["description"] = action.help
        props[longs[0][2:]] = prop
    props["models"] = {"type": "array", "items": _MODEL_ENTRY}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "openmlx serve --config",
            "type": "object", "additionalProperties": False, "properties": props}


def _line(root: Any, path: list[Any]) -> int:
    """The 1-based line of the YAML node at `path` (the nearest existing parent's line)."""
    import yaml

    node = root
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node.start_mark.line + 1


def load(path: Path, serve: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's settings as argparse destinations (`max-queue` -> `max_queue`), `models` as is."""
    import jsonschema
    import yaml

    try:
        text = Path(path).read_text()
        # Aliases (*name) are refused: a few hundred bytes of nested aliases expand to gigabytes
        # once anything walks the data (a "billion laughs").
        alias = next((e for e in yaml.parse(text) if isinstance(e, yaml.AliasEvent)), None)
        if alias is not None:
            raise ConfigError(f"{path}:{alias.start_mark.line + 1}: YAML aliases (*{alias.anchor}) are not accepted "
                              "in a config file; write the value out")
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"{path}: can't read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    for key, value in data.items() if isinstance(data, dict) else ():
        # JSON Schema's bounds let NaN through (every comparison with it is false): a NaN timeout never fires.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}:{_line(root, [key])}: '{key}': must be a finite number, not {value}")
    validator = jsonschema.Draft202012Validator(schema(serve))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = list(e.path)
        if e.validator == "additionalProperties":
            known = set(e.schema.get("properties", {}))
            extra = sorted(set(e.instance) - known) if isinstance(e.instance, dict) else []
            if extra:
                where = where + [extra[0]]
                raise ConfigError(f"{path}:{_line(root, where)}: unknown setting '{'.'.join(map(str, where))}'")
        name = ".".join(map(str, where)) or "(top level)"
        message = e.message
        if where and where[0] in _SECRET:
            shape = e.schema.get("type") if isinstance(e.schema, dict) else None
            message = f"must be {'a list of strings' if where == ['api-key'] else shape or 'valid'} (the value is not shown)"
        raise ConfigError(f"{path}:{_line(root, where)}: '{name}': {message}")
    dests = {o[2:]: a.dest for a in serve._actions for o in a.option_strings if o.startswith("--")}
    return {(dests[k] if k in dests else k): v for k, v in data.items()}


def apply(values: dict[str, Any], serve: argparse.ArgumentParser) -> None:
    """Make the file's values the `serve` defaults (flags given on the command line still win);
    `models` entries become --model-dir folders and the preloaded --model."""
    from engine.config import ModelSettings

    models = [ModelSettings(**m) for m in values.pop("models", [])]
    preload = [m for m in models if m.preload]
    if len(preload) > 1:
        raise ConfigError("models: at most one model can have preload: true")
    ids = [m.served_id for m in models]
    if len(set(ids)) < len(ids):
        raise ConfigError(f"models: two entries are served under the same id ({sorted(i for i in ids if ids.count(i) > 1)[0]})")
    # A folder without an id is served under its name, as --model-dir does; with an id, as an alias.
    folders = list(values.get("model_dir") or [])
    folders += [m.source for m in models if m.id is None and Path(m.source).expanduser().is_dir()]
    if folders:
        values["model_dir"] = folders
    if preload and "model" not in values:
        values["model"] = preload[0].served_id
    values["models"] = models
    serve.set_defaults(**values)
