"""Independent checks of bake's provenance output, with libraries that share no code with bake.

    provenance_check.py dsse ENVELOPE.json PUBLIC.pem   verify a DSSE envelope (securesystemslib)
    provenance_check.py spdx FILE.json                  parse and validate SPDX 2.3 (spdx-tools)
    provenance_check.py cyclonedx FILE.json             validate against the CycloneDX 1.5 schema
    provenance_check.py purls PURL...                   parse package URLs (packageurl-python)

Exits 0 when the check passes, 1 with the reasons on stderr when it does not.
"""

import base64
import json
import sys


def dsse(envelope_path, key_path):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    with open(envelope_path, "rb") as f:
        data = json.load(f)
    with open(key_path, "rb") as f:
        public = load_pem_public_key(f.read())
    # securesystemslib matches signatures to keys by keyid (a hint the DSSE spec leaves to the
    # application); give the key the id the envelope names.
    keyid = data["signatures"][0].get("keyid", "")
    key = SSlibKey.from_crypto(public, keyid=keyid)
    envelope = Envelope.from_dict(data)
    envelope.verify([key], 1)
    statement = json.loads(base64.b64decode(data["payload"]))
    print(json.dumps({"payloadType": envelope.payload_type, "_type": statement["_type"]}))


def spdx(path):
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    import os
    import shutil
    import tempfile

    # spdx-tools picks its parser by file extension; store blobs have none.
    with tempfile.TemporaryDirectory() as tmp:
        named = os.path.join(tmp, "sbom.spdx.json")
        shutil.copyfile(path, named)
        document = parse_file(named)
    messages = validate_full_spdx_document(document)
    if messages:
        for message in messages:
            print(message.validation_message, file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"packages": len(document.packages), "files": len(document.files)}))


def cyclonedx(path):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    with open(path) as f:
        text = f.read()
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
    if error is not None:
        print(error, file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"components": len(json.loads(text).get("components", []))}))


def purls(texts):
    from packageurl import PackageURL

    out = []
    for text in texts:
        purl = PackageURL.from_string(text)
        if purl.to_string() != text:
            print(f"{text} does not round-trip: {purl.to_string()}", file=sys.stderr)
            sys.exit(1)
        out.append(
            {"type": purl.type, "namespace": purl.namespace, "name": purl.name,
             "version": purl.version, "qualifiers": purl.qualifiers}
        )
    print(json.dumps(out))


def main():
    command, args = sys.argv[1], sys.argv[2:]
    try:
        if command == "dsse":
            dsse(*args)
        elif command == "spdx":
            spdx(*args)
        elif command == "cyclonedx":
            cyclonedx(*args)
        elif command == "purls":
            purls(args)
        else:
            sys.exit(f"unknown check {command}")
    except SystemExit:
        raise
    except Exception as error:  # any failure of the independent implementation fails the check
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
