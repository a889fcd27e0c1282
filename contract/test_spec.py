"""openapi.yaml itself: a valid OpenAPI 3.0 document Connexion accepts, with no YAML slips."""
from __future__ import annotations

import yaml

from contract.schemas import OUR_SPEC


def test_connexion_accepts_the_spec():
    from connexion.spec import Specification

    spec = Specification.load(OUR_SPEC)
    assert spec["openapi"].startswith("3.0")


def test_no_keys_swallowed_by_flow_mappings():
    """An unquoted ', ' inside `{description: ...}` silently turns words into keys with null values."""
    doc = yaml.safe_load(OUR_SPEC.read_text())
    allowed_null = {"param", "code"}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                assert value is not None or key in allowed_null, f"null value at {'/'.join(path + [str(key)])}"
                walk(value, path + [str(key)])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, path + [str(i)])

    walk(doc, [])
