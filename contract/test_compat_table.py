"""docs/compatibility.md is generated from the two specs and must be current."""
from contract import compat_table


def test_table_is_fresh():
    assert compat_table.main(["--check"]) == 0, "run: python -m contract.compat_table"


def test_every_vendor_field_is_classified_explicitly():
    import yaml

    from contract.schemas import OUR_SPEC, anthropic_spec_path, openai_spec_path

    docs = {"openai": yaml.safe_load(openai_spec_path().read_text()),
            "anthropic": yaml.safe_load(anthropic_spec_path().read_text())}
    ours = yaml.safe_load(OUR_SPEC.read_text())
    for _, component, vendor, their_component in compat_table.OPERATIONS:
        missing = set(compat_table.properties(docs[vendor], their_component)) \
            - set(compat_table.properties(ours, component))
        assert not missing, f"{component}: declare {sorted(missing)} in openapi.yaml (supported, rejected or ignored)"
