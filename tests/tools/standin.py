"""Shared parts of bake's AWS stand-ins: the HTTP server, the AWS protocols, validation, forwarding.

The stand-ins (imagebuilder_standin.py, asg_ecs_standin.py, throttle_proxy.py) sit in front of
moto and serve the few AWS operations moto lacks. This module owns what they share:

- `Request`: one HTTP request as received, with the account (`x-moto-account-id`, which the tests
  use to isolate their state) and the region and service of its SigV4 credential scope.
- `Api`: one AWS service's botocore model. It finds the operation a request calls (query and EC2
  protocols by `Action`, JSON by `X-Amz-Target`, REST-JSON by method and URI template), parses the
  request into typed parameters, validates them against the model and answers in the protocol's
  own success and error shapes.
- `StrictValidator`: botocore's `ParamValidator` checks types, required members, unknown members
  and minimums; AWS's servers also reject values above a maximum, outside an enum or not matching
  a pattern, and so does this subclass.
- `forward`: passes a request byte for byte (headers included, so auth and the account header
  reach moto) to the upstream and relays its answer.
- `Moto`: boto3 clients to the upstream, per service, region and account, for the stand-ins' own
  calls (registering AMIs, reading alarms, updating groups).
- `serve`: the command line every stand-in shares (`--port`, `--upstream`): binds 127.0.0.1,
  prints the port as the first line of stdout so that a test can read it, answers
  `GET /_standin/ready` with 200, serves until killed.

Not modelled here: SigV4 signatures are never checked (moto does not check them either); chunked
request bodies are reassembled before forwarding (sent on with a Content-Length); patterns use
Python's `re`, with Java's `\\p{L}`/`\\p{N}`/`\\p{Z}` classes approximated by `\\w` and `\\s`.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import email.message
import http.client
import http.server
import json
import re
import sys
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from xml.sax.saxutils import escape

import boto3
import botocore.config
import botocore.session
from botocore import loaders, model
from botocore import validate as checks
from botocore.utils import parse_to_aware_datetime

DEFAULT_ACCOUNT = "123456789012"
DEFAULT_REGION = "us-east-1"
ACCOUNT_HEADER = "x-moto-account-id"
# Headers that belong to one hop, not to the request: never copied between connections.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    # The stand-in has read the whole body already; moto must not be asked to send 100 Continue.
    "expect",
}
# How long a forwarded request may take upstream; moto answers in milliseconds, a slow answer
# means moto hangs, and a test should fail rather than wait forever.
UPSTREAM_TIMEOUT = 120

# Answers 200 once the stand-in serves (for scripts that start it and wait).
READY_PATH = "/_standin/ready"
# An error names at most this many allowed values (EC2's InstanceType enum has a thousand).
ENUM_SHOWN = 12

_LOADER = loaders.Loader()
_CREDENTIAL = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request")
_MISSING = object()


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def request_id() -> str:
    return str(uuid.uuid4())


class ApiError(Exception):
    """An error answer in AWS's own terms: the error code, its message and HTTP status."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 400,
        sender: bool = True,
        fields: dict | None = None,
    ):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.sender = sender
        # Members of the error's shape beyond its message (EBS's `Reason`), for JSON protocols.
        self.fields = fields or {}


@dataclass
class Request:
    method: str
    raw_path: str  # path and query string as received
    headers: email.message.Message  # case-insensitive, keeps duplicates and order
    body: bytes

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.raw_path).path

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(
            urllib.parse.urlsplit(self.raw_path).query, keep_blank_values=True
        )

    @property
    def account(self) -> str:
        return self.headers.get(ACCOUNT_HEADER) or DEFAULT_ACCOUNT

    def _scope(self) -> tuple[str, str] | None:
        found = _CREDENTIAL.search(self.headers.get("Authorization") or "")
        if found:
            return found.group(1), found.group(2)
        credential = self.query.get("X-Amz-Credential")
        if credential:
            parts = credential[0].split("/")
            if len(parts) == 5:
                return parts[2], parts[3]
        return None

    @property
    def region(self) -> str:
        scope = self._scope()
        return scope[0] if scope else DEFAULT_REGION

    @property
    def signing_service(self) -> str | None:
        """The service the request was signed for (`ec2`, `ecs`, `imagebuilder`...)."""
        scope = self._scope()
        if scope:
            return scope[1]
        target = self.headers.get("X-Amz-Target")
        return target.split(".")[0] if target else None

    def form(self) -> dict[str, str]:
        """The query protocols' parameters: the form body, or the query string of a GET."""
        pairs: dict[str, str] = {}
        for key, values in self.query.items():
            pairs[key] = values[0]
        content_type = self.headers.get("Content-Type") or ""
        if self.body and "x-www-form-urlencoded" in content_type:
            text = self.body.decode("utf-8")
            for key, values in urllib.parse.parse_qs(text, keep_blank_values=True).items():
                pairs[key] = values[0]
        return pairs


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, document: Any, content_type: str = "application/json") -> Response:
    body = json.dumps(document, default=_json_default).encode()
    return Response(status, body, [("Content-Type", content_type)])


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# --- validation ---------------------------------------------------------------------------------


def _python_pattern(pattern: str) -> re.Pattern | None:
    """Java regular expressions as AWS's models write them, in Python's dialect (None: unusable)."""
    translated = (
        pattern.replace(r"\uD800\uDC00-\uDBFF\uDFFF", r"\U00010000-\U0010FFFF")
        .replace(r"\p{L}", r"\w")
        .replace(r"\p{N}", r"\w")
        .replace(r"\p{Z}", r"\s")
    )
    try:
        return re.compile(translated, re.DOTALL)
    except re.error:
        return None


class StrictErrors(checks.ValidationErrors):
    """botocore's report, plus the constraints AWS's servers check and botocore does not."""

    def _format_error(self, error):
        error_type, name, additional = error
        where = self._get_name(name)
        if error_type == "too long":
            return (
                f"Invalid length for parameter {where}, value: {additional['param']}, "
                f"valid max length: {additional['max_allowed']}"
            )
        if error_type == "too large":
            return (
                f"Invalid value for parameter {where}, value: {additional['param']}, "
                f"valid max value: {additional['max_allowed']}"
            )
        if error_type == "not in enum":
            allowed = ", ".join(additional["allowed"][:ENUM_SHOWN])
            if len(additional["allowed"]) > ENUM_SHOWN:
                allowed += f", ... ({len(additional['allowed'])} values)"
            return (
                f"Invalid value for parameter {where}, value: {additional['param']}, "
                f"must be one of: {allowed}"
            )
        if error_type == "pattern":
            return (
                f"Invalid value for parameter {where}, value: {additional['param']}, "
                f"must match pattern: {additional['pattern']}"
            )
        return super()._format_error(error)

    def messages(self) -> list[str]:
        return [self._format_error(error) for error in self._errors]

    def kinds(self) -> set[str]:
        return {error[0] for error in self._errors}


class StrictValidator(checks.ParamValidator):
    """`ParamValidator` that also checks maximums, enums and patterns, as AWS's servers do."""

    VALIDATED_METADATA_ATTRS = checks.ParamValidator.VALIDATED_METADATA_ATTRS | {
        "max",
        "enum",
        "pattern",
    }
    _patterns: dict[str, re.Pattern | None] = {}

    def validate(self, params, shape):
        errors = StrictErrors()
        self._validate(params, shape, errors, name="")
        return errors

    def _check_max(self, name, value, shape, errors, kind):
        maximum = shape.metadata.get("max")
        if maximum is not None and value > maximum:
            errors.report(name, kind, param=value, max_allowed=maximum)

    @checks.type_check(valid_types=checks.ParamValidator.SCALAR_TYPES["string"])
    def _validate_string(self, param, shape, errors, name):
        checks.range_check(name, len(param), shape, "invalid length", errors)
        self._check_max(name, len(param), shape, errors, "too long")
        if shape.enum and param not in shape.enum:
            errors.report(name, "not in enum", param=param, allowed=shape.enum)
        pattern = shape.metadata.get("pattern")
        if pattern:
            if pattern not in self._patterns:
                self._patterns[pattern] = _python_pattern(pattern)
            compiled = self._patterns[pattern]
            if compiled is not None and not compiled.fullmatch(param):
                errors.report(name, "pattern", param=param, pattern=pattern)

    @checks.type_check(valid_types=checks.ParamValidator.CONTAINER_TYPES["list"])
    def _validate_list(self, param, shape, errors, name):
        checks.range_check(name, len(param), shape, "invalid length", errors)
        self._check_max(name, len(param), shape, errors, "too long")
        for i, item in enumerate(param):
            self._validate(item, shape.member, errors, f"{name}[{i}]")

    @checks.type_check(valid_types=checks.ParamValidator.CONTAINER_TYPES["map"])
    def _validate_map(self, param, shape, errors, name):
        checks.range_check(name, len(param), shape, "invalid length", errors)
        self._check_max(name, len(param), shape, errors, "too long")
        for key, value in param.items():
            self._validate(key, shape.key, errors, f"{name} (key: {key})")
            self._validate(value, shape.value, errors, f"{name}.{key}")

    @checks.type_check(valid_types=checks.ParamValidator.SCALAR_TYPES["integer"])
    def _validate_integer(self, param, shape, errors, name):
        checks.range_check(name, param, shape, "invalid range", errors)
        self._check_max(name, param, shape, errors, "too large")

    _validate_long = _validate_integer

    @checks.type_check(valid_types=checks.ParamValidator.SCALAR_TYPES["double"])
    def _validate_double(self, param, shape, errors, name):
        checks.range_check(name, param, shape, "invalid range", errors)
        self._check_max(name, param, shape, errors, "too large")

    _validate_float = _validate_double


# --- protocols ----------------------------------------------------------------------------------


class Api:
    """One AWS service as its botocore model describes it, for the server side of its protocol."""

    # The error code AWS answers to a request that breaks the model, per protocol.
    VALIDATION_CODES = {
        "query": "ValidationError",
        "ec2": "InvalidParameterValue",
        "json": "ValidationException",
        "rest-json": "ValidationException",
    }

    def __init__(self, service: str, validation_code: str | None = None):
        data = _LOADER.load_service_model(service, "service-2")
        self.model = model.ServiceModel(data, service)
        self.service = service
        self.protocol = self.model.protocol
        self.validation_code = validation_code or self.VALIDATION_CODES[self.protocol]
        self._validator = StrictValidator()
        self._routes = self._rest_routes() if self.protocol.startswith("rest") else []

    # Which operation a request calls.

    def operation(self, request: Request) -> model.OperationModel | None:
        try:
            if self.protocol in ("query", "ec2"):
                action = request.form().get("Action")
                return self.model.operation_model(action) if action else None
            if self.protocol == "json":
                target = request.headers.get("X-Amz-Target") or ""
                prefix, _, name = target.partition(".")
                if prefix != self.model.metadata.get("targetPrefix"):
                    return None
                return self.model.operation_model(name)
        except model.OperationNotFoundError:
            return None
        for method, pattern, required_query, operation in self._routes:
            if method == request.method and pattern.fullmatch(request.path):
                query = request.query
                if all(query.get(k, [None])[0] == v for k, v in required_query.items()):
                    return operation
        return None

    def _rest_routes(self):
        routes = []
        for name in self.model.operation_names:
            operation = self.model.operation_model(name)
            path, _, query = operation.http["requestUri"].partition("?")
            regex = ""
            for part in re.split(r"(\{[^}]+\})", path):
                if part.startswith("{"):
                    regex += "(.+)" if part.endswith("+}") else "([^/]+)"
                else:
                    regex += re.escape(part)
            required = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
            # Literal segments first: `/tags/{arn}` must not swallow a longer literal route.
            specificity = (len(path.replace("{", "").split("/")), -path.count("{"))
            routes.append(
                (specificity, operation.http["method"], re.compile(regex), required, operation)
            )
        routes.sort(key=lambda r: r[0], reverse=True)
        return [r[1:] for r in routes]

    # Parsing into typed parameters.

    def parse(self, request: Request, operation: model.OperationModel) -> dict:
        shape = operation.input_shape
        if shape is None:
            return {}
        if self.protocol in ("query", "ec2"):
            flat = request.form()
            flat.pop("Action", None)
            flat.pop("Version", None)
            used: set[str] = set()
            params = self._from_query(shape, "", flat, used)
            unknown = sorted(set(flat) - used)
            if unknown:
                code = "UnknownParameter" if self.protocol == "ec2" else self.validation_code
                raise ApiError(code, f"The parameter {unknown[0]} is not recognized")
            return params if params is not _MISSING else {}
        if self.protocol == "json":
            return self._json_body(request.body)
        return self._from_rest(request, operation)

    def _json_body(self, body: bytes) -> dict:
        if not body.strip():
            return {}
        try:
            document = json.loads(body)
        except ValueError as error:
            raise ApiError("SerializationException", f"the request body is not JSON: {error}")
        if not isinstance(document, dict):
            raise ApiError("SerializationException", "the request body is not a JSON object")
        return document

    def _query_name(self, member_name: str, shape: model.Shape) -> str:
        serialization = shape.serialization
        if self.protocol == "ec2":
            if "queryName" in serialization:
                return serialization["queryName"]
            if "name" in serialization:
                return serialization["name"][0].upper() + serialization["name"][1:]
            return member_name
        return serialization.get("name", member_name)

    def _from_query(self, shape, prefix, flat, used):
        kind = shape.type_name
        if kind == "structure":
            out = {}
            for name, member in shape.members.items():
                key = self._query_name(name, member)
                value = self._from_query(member, f"{prefix}.{key}" if prefix else key, flat, used)
                if value is not _MISSING:
                    out[name] = value
            return out if out or not prefix else _MISSING
        if kind == "list":
            if flat.get(prefix) == "":
                used.add(prefix)
                return []
            if self.protocol == "ec2":
                list_prefix = prefix
            elif shape.serialization.get("flattened"):
                list_prefix = prefix
                member_name = shape.member.serialization.get("name")
                if member_name:
                    list_prefix = ".".join(prefix.split(".")[:-1] + [member_name])
            else:
                list_prefix = f"{prefix}.{shape.member.serialization.get('name', 'member')}"
            indices = sorted(
                {
                    int(rest.split(".")[0])
                    for key in flat
                    if key.startswith(list_prefix + ".")
                    and (rest := key[len(list_prefix) + 1 :]).split(".")[0].isdigit()
                }
            )
            if not indices:
                return _MISSING
            items = []
            for index in indices:
                item = self._from_query(shape.member, f"{list_prefix}.{index}", flat, used)
                items.append({} if item is _MISSING else item)
            return items
        if kind == "map":
            entry = prefix if shape.serialization.get("flattened") else f"{prefix}.entry"
            key_name = shape.key.serialization.get("name", "key")
            value_name = shape.value.serialization.get("name", "value")
            out = {}
            index = 1
            while f"{entry}.{index}.{key_name}" in flat:
                key = self._from_query(shape.key, f"{entry}.{index}.{key_name}", flat, used)
                value = self._from_query(shape.value, f"{entry}.{index}.{value_name}", flat, used)
                out[key] = None if value is _MISSING else value
                index += 1
            return out if out else _MISSING
        if prefix not in flat:
            return _MISSING
        used.add(prefix)
        return self._scalar(shape, flat[prefix], prefix)

    def _scalar(self, shape, raw: str, where: str):
        """A query, URI or header value converted to the type its shape names."""
        kind = shape.type_name
        try:
            if kind in ("integer", "long"):
                return int(raw)
            if kind in ("double", "float"):
                return float(raw)
            if kind == "boolean":
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                return raw.lower() == "true"
            if kind == "timestamp":
                return parse_to_aware_datetime(raw)
        except (ValueError, TypeError):
            raise ApiError(
                self.validation_code,
                f"Value '{raw}' at '{where}' failed to satisfy constraint: Member must be a {kind}",
            ) from None
        return raw

    def _from_rest(self, request: Request, operation: model.OperationModel) -> dict:
        shape = operation.input_shape
        params: dict[str, Any] = {}
        path, _, _ = operation.http["requestUri"].partition("?")
        labels = [label.strip("{}+") for label in re.findall(r"\{[^}]+\}", path)]
        pattern = next(r[1] for r in self._routes if r[3] is operation)
        values = pattern.fullmatch(request.path).groups()
        by_location = {label: urllib.parse.unquote(value) for label, value in zip(labels, values)}
        query = request.query
        payload = shape.serialization.get("payload")
        body_members = {}
        for name, member in shape.members.items():
            location = member.serialization.get("location")
            wire = member.serialization.get("name", name)
            if location == "uri" and wire in by_location:
                params[name] = self._scalar(member, by_location[wire], name)
            elif location == "querystring":
                if member.type_name == "list" and wire in query:
                    params[name] = [self._scalar(member.member, v, name) for v in query[wire]]
                elif member.type_name == "map":
                    continue  # a map of the remaining query parameters: no operation here uses it
                elif wire in query:
                    params[name] = self._scalar(member, query[wire][0], name)
            elif location == "header":
                value = request.headers.get(wire)
                if value is not None:
                    params[name] = self._scalar(member, value, name)
            elif location == "headers":
                continue
            elif name == payload:
                if member.type_name in ("blob", "string"):
                    params[name] = request.body
                elif request.body:
                    params[name] = self._json_body(request.body)
            elif location is None:
                body_members[name] = member
        if payload is None and body_members:
            document = self._json_body(request.body)
            for key, value in document.items():
                params[key] = value  # unknown keys stay, so that validation reports them
        return params

    # Validation.

    def validate(self, operation: model.OperationModel, params: dict) -> None:
        if operation.input_shape is None:
            return
        report = self._validator.validate(params, operation.input_shape)
        if not report.has_errors():
            return
        messages = report.messages()
        code = self.validation_code
        if self.protocol == "ec2":
            # EC2 names the first problem it meets; a missing parameter comes first.
            kinds = report.kinds()
            if "missing required field" in kinds:
                code = "MissingParameter"
            elif kinds == {"unknown field"}:
                code = "UnknownParameter"
        count = len(messages)
        summary = f"{count} validation error{'s' if count > 1 else ''} detected: "
        raise ApiError(code, summary + "; ".join(messages))

    def parse_and_validate(self, request: Request) -> tuple[model.OperationModel, dict] | None:
        operation = self.operation(request)
        if operation is None:
            return None
        params = self.parse(request, operation)
        self.validate(operation, params)
        return operation, params

    # Answers.

    def respond(self, operation: model.OperationModel, result: dict) -> Response:
        if self.protocol == "json":
            version = self.model.metadata.get("jsonVersion", "1.1")
            return json_response(200, result, f"application/x-amz-json-{version}")
        if self.protocol.startswith("rest"):
            return json_response(operation.http.get("responseCode", 200), result)
        shape = operation.output_shape
        inner = self._xml_members(shape, result) if shape is not None else ""
        name = operation.name
        wrapper = shape.serialization.get("resultWrapper") if shape is not None else None
        if wrapper:
            inner = f"<{wrapper}>{inner}</{wrapper}>"
        namespace = self.model.metadata.get("xmlNamespace", "")
        body = (
            f'<{name}Response xmlns="{namespace}">{inner}'
            f"<ResponseMetadata><RequestId>{request_id()}</RequestId></ResponseMetadata>"
            f"</{name}Response>"
        )
        return Response(200, body.encode(), [("Content-Type", "text/xml")])

    def _xml_members(self, shape, value: dict) -> str:
        parts = []
        for name, member in shape.members.items():
            if value.get(name) is not None:
                parts.append(self._xml(member, value[name], member.serialization.get("name", name)))
        return "".join(parts)

    def _xml(self, shape, value, name: str) -> str:
        kind = shape.type_name
        if kind == "structure":
            return f"<{name}>{self._xml_members(shape, value)}</{name}>"
        if kind == "list":
            member_name = shape.member.serialization.get("name", "member")
            items = "".join(self._xml(shape.member, item, member_name) for item in value)
            if shape.serialization.get("flattened"):
                return "".join(self._xml(shape.member, item, name) for item in value)
            return f"<{name}>{items}</{name}>"
        if kind == "map":
            entries = "".join(
                f"<entry>{self._xml(shape.key, k, 'key')}{self._xml(shape.value, v, 'value')}</entry>"
                for k, v in value.items()
            )
            return f"<{name}>{entries}</{name}>"
        if kind == "timestamp":
            if isinstance(value, dt.datetime):
                value = value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        elif kind == "boolean":
            value = "true" if value else "false"
        elif kind == "blob" and isinstance(value, (bytes, bytearray)):
            value = base64.b64encode(value).decode()
        return f"<{name}>{escape(str(value))}</{name}>"

    def error(self, error: ApiError) -> Response:
        rid = request_id()
        if self.protocol == "json":
            return json_response(
                error.status,
                {"__type": error.code, "message": error.message, **error.fields},
                f"application/x-amz-json-{self.model.metadata.get('jsonVersion', '1.1')}",
            )
        if self.protocol.startswith("rest"):
            document = {"message": error.message, "code": error.code, **error.fields}
            response = json_response(error.status, document)
            response.headers.append(("x-amzn-ErrorType", error.code))
            response.headers.append(("x-amzn-RequestId", rid))
            return response
        message = escape(error.message)
        if self.protocol == "ec2":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Response><Errors><Error><Code>{error.code}</Code><Message>{message}</Message>"
                f"</Error></Errors><RequestID>{rid}</RequestID></Response>"
            )
        else:
            namespace = self.model.metadata.get("xmlNamespace", "")
            kind = "Sender" if error.sender else "Receiver"
            body = (
                f'<ErrorResponse xmlns="{namespace}"><Error><Type>{kind}</Type>'
                f"<Code>{error.code}</Code><Message>{message}</Message></Error>"
                f"<RequestId>{rid}</RequestId></ErrorResponse>"
            )
        return Response(error.status, body.encode(), [("Content-Type", "text/xml")])


# --- forwarding ---------------------------------------------------------------------------------


def forward(upstream: str, request: Request) -> Response:
    """Sends the request, unchanged, to the upstream server and returns its answer."""
    target = urllib.parse.urlsplit(upstream)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=UPSTREAM_TIMEOUT)
    try:
        connection.putrequest(
            request.method, request.raw_path, skip_host=True, skip_accept_encoding=True
        )
        for key, value in request.headers.items():
            if key.lower() not in HOP_BY_HOP:
                connection.putheader(key, value)
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            connection.putheader("Content-Length", str(len(request.body)))
        connection.endheaders(request.body or None)
        answer = connection.getresponse()
        body = answer.read()
        headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP]
        return Response(answer.status, body, headers)
    finally:
        connection.close()


class Moto:
    """boto3 clients to the upstream moto, per service, region and account (the account header)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self._session = botocore.session.get_session()
        # One boto3 session over the botocore one: each boto3 session registers its handlers on
        # the botocore session, and a second one makes the next S3 client fail ("Cannot inject
        # class attribute upload_file").
        self._boto = boto3.Session(
            botocore_session=self._session,
            aws_access_key_id="standin",
            aws_secret_access_key="standin",
        )
        self._clients: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str, region: str, account: str):
        key = (service, region, account)
        with self._lock:
            if key not in self._clients:
                client = self._boto.client(
                    service,
                    region_name=region,
                    endpoint_url=self.upstream,
                    config=botocore.config.Config(retries={"max_attempts": 1}),
                )

                def add_account(request, **_):
                    request.headers[ACCOUNT_HEADER] = account

                client.meta.events.register("before-sign", add_account)
                self._clients[key] = client
            return self._clients[key]


# --- the server ---------------------------------------------------------------------------------


Handler = Callable[[Request], Response]


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self):
        request = Request(self.command, self.path, self.headers, self._read_body())
        try:
            if request.path == READY_PATH:
                response = json_response(200, {"ready": True})
            else:
                response = self.server.handler(request)
        except Exception as error:  # a stand-in bug: say so in AWS's words, and in the log
            import traceback

            traceback.print_exc()
            response = json_response(500, {"__type": "InternalFailure", "message": repr(error)})
        if response is None:
            # The handler held the request and gave up on it (a stall): nothing is answered.
            self.close_connection = True
            return
        self.send_response(response.status)
        for key, value in response.headers:
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _serve


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Many SDK connections at once (a 20-region fan-out, parallel block uploads).
    request_queue_size = 128

    def __init__(self, port: int, handler: Handler, verbose: bool):
        super().__init__(("127.0.0.1", port), _HttpHandler)
        self.handler = handler
        self.verbose = verbose


def loopback_url(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--upstream must be on loopback, not {host}")
    return url.rstrip("/")


def common_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick one)")
    parser.add_argument(
        "--upstream", required=True, type=loopback_url, help="moto's URL, http://127.0.0.1:PORT"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


def serve(port: int, handler: Handler, verbose: bool = False) -> None:
    """Serves on 127.0.0.1:PORT; prints the port on the first line of stdout, then serves."""
    server = _Server(port, handler, verbose)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
