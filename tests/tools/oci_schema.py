"""Validate an OCI document against the image-spec JSON schemas (an independent checker).

usage: oci_schema.py SCHEMA_DIR KIND FILE...
KIND is one of: manifest, config, index, layout.

The schemas refer to each other by URLs under https://opencontainers.org/schema/; every such
reference is served from SCHEMA_DIR by file name, which is how the image-spec's own validator
loads them.
"""

import json
import pathlib
import sys

from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

SCHEMAS = {
    "manifest": "image-manifest-schema.json",
    "config": "config-schema.json",
    "index": "image-index-schema.json",
    "layout": "image-layout-schema.json",
}


def main() -> int:
    schema_dir = pathlib.Path(sys.argv[1])
    kind = sys.argv[2]

    def retrieve(uri: str) -> Resource:
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        text = (schema_dir / name).read_text()
        return Resource.from_contents(json.loads(text), default_specification=DRAFT4)

    registry = Registry(retrieve=retrieve)
    schema = json.loads((schema_dir / SCHEMAS[kind]).read_text())
    validator = Draft4Validator(schema, registry=registry)
    failed = False
    for path in sys.argv[3:]:
        document = json.loads(pathlib.Path(path).read_text())
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
        for error in errors:
            failed = True
            where = "/".join(str(p) for p in error.path) or "(top)"
            print(f"{path}: {kind}: {where}: {error.message}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
