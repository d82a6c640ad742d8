"""Validate AWSTOE component documents (YAML) against the schema in
tests/fixtures/imagebuilder/awstoe-component.schema.json (an independent checker of what
`bake export imagebuilder` writes).

usage: awstoe_schema.py SCHEMA FILE...

Besides the schema, checks what JSON Schema cannot say: step names are unique within a phase,
and each phase appears at most once (both as AWS documents them). Prints one line per problem
and exits 1 if there is any.
"""

import json
import pathlib
import sys

import yaml
from jsonschema import Draft202012Validator


def main() -> int:
    schema = json.loads(pathlib.Path(sys.argv[1]).read_text())
    validator = Draft202012Validator(schema)
    failed = False
    for path in sys.argv[2:]:
        document = yaml.safe_load(pathlib.Path(path).read_text())
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
        for error in errors:
            failed = True
            where = "/".join(str(p) for p in error.path) or "(top)"
            print(f"{path}: {where}: {error.message}")
        phases = [p.get("name") for p in (document or {}).get("phases") or [] if isinstance(p, dict)]
        for name in {p for p in phases if phases.count(p) > 1}:
            failed = True
            print(f"{path}: phase {name} appears more than once")
        for phase in (document or {}).get("phases") or []:
            steps = [s.get("name") for s in phase.get("steps") or [] if isinstance(s, dict)]
            for name in {s for s in steps if steps.count(s) > 1}:
                failed = True
                print(f"{path}: step {name} appears more than once in phase {phase.get('name')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
