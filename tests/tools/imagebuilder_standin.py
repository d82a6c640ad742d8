#!/usr/bin/env python3
"""A stand-in for EC2 Image Builder in front of moto: resources, builds, and AMIs landing in moto.

moto has no Image Builder. This server serves Image Builder's REST-JSON API and forwards every
other request (EC2, SSM, S3...) byte for byte to moto (`--upstream`), so one endpoint serves a
whole bake run. State is per account (`x-moto-account-id`) and region (SigV4 credential scope):
each resource's ARN names both. Every Image Builder request is validated against botocore's model
first (shapes, required members, enums, patterns, lengths, ranges; see standin.py) and a bad one is
answered `ValidationException` (HTTP 400), as AWS's front end does.

Modelled:

- Components (`data`, or `uri` read from moto's S3; the YAML must parse and have `phases`),
  image recipes, container recipes, infrastructure configurations (the instance profile, subnet,
  security groups and key pair must exist in moto), distribution configurations, image pipelines: create, get, list (with `name`,
  `platform`, `type`, `version` filters, `owner` Self, paging), update where AWS has it, delete
  (`ResourceDependencyException` while a recipe, pipeline or running image uses it). ARNs follow
  AWS's forms: `component/NAME/1.0.0/1` (build version, the build number counts up per version),
  `image-recipe/NAME/1.0.0`, `image/RECIPE/1.0.0/N`, `infrastructure-configuration/NAME`, names
  lower-cased with spaces as dashes; `x` wildcards in version ARNs resolve to the newest match.
- A second create of an existing name and version: `ResourceAlreadyExistsException` where the
  operation's model lists it, else `ResourceInUseException` (CreateComponent, as AWS answers).
  Semantic versions must be `MAJOR.MINOR.PATCH` (`InvalidVersionNumberException`).
- `clientToken` idempotency on every create, update, start and cancel: the same token with the
  same request returns the first answer; with a different request,
  `IdempotentParameterMismatchException`.
- Builds (`CreateImage`, `StartImagePipelineExecution`): `PENDING → CREATING → BUILDING →
  TESTING → DISTRIBUTING → INTEGRATING → AVAILABLE`, one state every `--step-seconds`
  (TESTING is skipped when `imageTestsConfiguration.imageTestsEnabled` is false). On
  DISTRIBUTING the output AMI is registered in moto in the build's region and account
  (`RegisterImage`), copied to every other distribution region (`CopyImage`), registered in each
  `targetAccountIds` account (moto cannot copy across accounts), tagged with the distribution's
  `amiTags` plus Image Builder's `CreatedBy`/`Ec2ImageBuilderArn`, and shared with its
  `launchPermission`. On INTEGRATING, `launchTemplateConfigurations` get a new launch template
  version naming the AMI (the default version when `setDefaultVersion`), and
  `ssmParameterConfigurations` get the AMI id (PutParameter, overwrite). `GetImage` shows
  `outputResources.amis`.
- Container recipes: on DISTRIBUTING an OCI manifest (no layers; a config whose labels name the
  parent image and the build) is pushed to `--registry HOST:PORT`, which stands in for the
  account's ECR registry, as `REPOSITORY:VERSION-BUILD` and as each `containerTags` entry of the
  build region's `containerDistributionConfiguration`; `outputResources.containers` names them
  as AWS does, on the ECR host (`ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY:TAG`), so a
  client maps that host to `--registry` (bake: `BAKE_REGISTRY_ENDPOINTS`). Without
  `--registry`, a container build fails with that reason. Not modelled for containers: the
  Dockerfile template (stored, never built), distribution to other regions or to a
  distribution's own `targetRepository` (only the recipe's repository receives the image), and
  moto's ECR (the repository need not exist there; moto's ECR has no registry API).
- `S3Download` steps of build components: the build fails in BUILDING, naming the step and the
  URI, when a source object is not in moto's S3 (downloaded bytes are not checked: nothing runs).
- Failing builds, on purpose: a component whose document contains `BAKE_STANDIN_FAIL_BUILD` fails
  the build in BUILDING, `BAKE_STANDIN_FAIL_TEST` in TESTING: state `FAILED`, `imageStatus.reason`
  naming the component, the workflow step `FAILED`. A moto error while distributing fails it too.
- `CancelImageCreation`: `CANCELLED` from PENDING, CREATING, BUILDING or TESTING;
  `ResourceInUseException` while distributing or integrating; `InvalidRequestException` once done.
- Workflows: every build has the `build-image` and `test-image` executions of AWS's managed
  workflows, with their steps (`ListWorkflowExecutions`, `GetWorkflowExecution`,
  `ListWorkflowStepExecutions`, `GetWorkflowStepExecution`) following the image's state.
- Tags: `TagResource`, `UntagResource`, `ListTagsForResource` on every resource above.

Not modelled: building anything (components never run; their documents are only parsed), AWSTOE
document validation beyond `phases`, AWS-owned (`:aws:`) components and images (accepted as they
are), lifecycle policies, custom workflows (`CreateWorkflow`, `workflows` parameters are stored
only), image scanning, policies (`Put*Policy`), imports, `DistributeImage`, `RetryImage`,
`SendWorkflowStepAction`, schedules (pipelines run only when started), KMS encryption (passed to
CopyImage, which moto ignores), fast launch, S3 export, license configurations, cross-account
copies (registered, not copied), image deprecation. Those operations answer
`InvalidRequestException` naming this file, never a silent success.

Usage: imagebuilder_standin.py --upstream http://127.0.0.1:MOTO_PORT [--port 0]
       [--step-seconds 0.5] [--registry 127.0.0.1:PORT]
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions
import yaml

import standin
from standin import ApiError, Request, Response, now

FAIL_BUILD_MARKER = "BAKE_STANDIN_FAIL_BUILD"
FAIL_TEST_MARKER = "BAKE_STANDIN_FAIL_TEST"
# AWS's ordered image states for a build that succeeds.
STATES = ["PENDING", "CREATING", "BUILDING", "TESTING", "DISTRIBUTING", "INTEGRATING", "AVAILABLE"]
CANCELLABLE = {"PENDING", "CREATING", "BUILDING", "TESTING"}
IN_PROGRESS = set(STATES[:-1])
SEMVER = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
# Steps of AWS's managed workflows `build-image` and `test-image`: (name, action, state it runs in).
BUILD_STEPS = [
    ("LaunchBuildInstance", "LaunchInstance", "CREATING"),
    ("ApplyBuildComponents", "ExecuteComponents", "BUILDING"),
    ("InventoryCollection", "CollectImageMetadata", "BUILDING"),
    ("RunSanitizeScript", "SanitizeInstance", "BUILDING"),
    ("CreateOutputAMI", "CreateImage", "BUILDING"),
    ("TerminateBuildInstance", "TerminateInstance", "BUILDING"),
]
TEST_STEPS = [
    ("LaunchTestInstance", "LaunchInstance", "TESTING"),
    ("ApplyTestComponents", "ExecuteComponents", "TESTING"),
    ("TerminateTestInstance", "TerminateInstance", "TESTING"),
]
# Resource kinds: ARN segment, output member of Get*, and whether the ARN carries a version.
KINDS = {
    "component": ("component", True),
    "image-recipe": ("imageRecipe", True),
    "container-recipe": ("containerRecipe", True),
    "infrastructure-configuration": ("infrastructureConfiguration", False),
    "distribution-configuration": ("distributionConfiguration", False),
    "image-pipeline": ("imagePipeline", False),
    "image": ("image", True),
}


def arn_name(name: str) -> str:
    return name.lower().replace(" ", "-")


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def fingerprint(params: dict) -> str:
    rest = {k: v for k, v in params.items() if k != "clientToken"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Step:
    id: str
    name: str
    action: str
    state: str
    status: str = "PENDING"
    message: str | None = None
    started: Any = None
    ended: Any = None


@dataclass
class Workflow:
    id: str
    kind: str  # BUILD | TEST
    arn: str
    steps: list[Step]
    status: str = "PENDING"
    message: str | None = None
    started: Any = None
    ended: Any = None


@dataclass
class Build:
    arn: str
    account: str
    region: str
    image: dict  # the Image answer, kept current
    components: list[dict]
    workflows: list[Workflow]
    tests: bool
    next_at: float = 0.0
    amis: list[dict] = field(default_factory=list)


class ImageBuilder:
    def __init__(self, upstream: str, step_seconds: float, registry: str | None):
        self.upstream = upstream
        self.step_seconds = step_seconds
        self.registry = registry
        self.api = standin.Api("imagebuilder")
        self.moto = standin.Moto(upstream)
        self.resources: dict[str, dict] = {}  # ARN → the resource as Get* shows it
        self.kinds: dict[str, str] = {}  # ARN → kind
        self.builds: dict[str, Build] = {}
        self.tokens: dict[tuple, tuple[str, dict]] = {}
        self.lock = threading.RLock()
        threading.Thread(target=self._clock, daemon=True).start()

    # --- plumbing ----------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        if request.signing_service != "imagebuilder":
            return standin.forward(self.upstream, request)
        try:
            found = self.api.parse_and_validate(request)
            if found is None:
                raise ApiError(
                    "InvalidRequestException",
                    f"no Image Builder operation at {request.method} {request.path}",
                )
            operation, params = found
            method = getattr(self, f"_{operation.name}", None)
            if method is None:
                raise ApiError(
                    "InvalidRequestException",
                    f"{operation.name} is not modelled by tests/tools/imagebuilder_standin.py",
                )
            token = params.get("clientToken")
            if token is not None:
                key = (request.account, request.region, operation.name, token)
                with self.lock:
                    if key in self.tokens:
                        seen, answer = self.tokens[key]
                        if seen != fingerprint(params):
                            raise ApiError(
                                "IdempotentParameterMismatchException",
                                f"The client token {token} was used with a different request.",
                            )
                        return self.api.respond(operation, answer)
                    answer = method(request, params)
                    answer.setdefault("requestId", standin.request_id())
                    answer["clientToken"] = token
                    self.tokens[key] = (fingerprint(params), answer)
            else:
                answer = method(request, params)
                if "requestId" in (
                    operation.output_shape.members if operation.output_shape else {}
                ):
                    answer.setdefault("requestId", standin.request_id())
            return self.api.respond(operation, answer)
        except ApiError as error:
            return self.api.error(error)

    def _arn(
        self, request, kind: str, name: str, version: str | None = None, build: int | None = None
    ) -> str:
        arn = f"arn:aws:imagebuilder:{request.region}:{request.account}:{kind}/{arn_name(name)}"
        if version:
            arn += f"/{version}"
        if build is not None:
            arn += f"/{build}"
        return arn

    def _get(self, request, arn: str, kinds: tuple[str, ...]) -> dict:
        """The resource an ARN names (a version ARN with `x` resolves to the newest match)."""
        with self.lock:
            resolved = self._resolve(arn)
            if resolved is None or self.kinds.get(resolved) not in kinds:
                raise ApiError(
                    "ResourceNotFoundException", f"The resource {arn} does not exist.", 404
                )
            resource = self.resources[resolved]
        if f":{request.region}:{request.account}:" not in resolved:
            raise ApiError("ResourceNotFoundException", f"The resource {arn} does not exist.", 404)
        return resource

    def _resolve(self, arn: str) -> str | None:
        if arn in self.resources:
            return arn
        head, _, tail = arn.rpartition("/")
        if re.fullmatch(r"(?:[0-9]+|x)\.(?:[0-9]+|x)\.(?:[0-9]+|x)", tail):
            pattern = tail.replace(".", r"\.").replace("x", r"[0-9]+")
            candidates = [
                a
                for a in self.resources
                if re.fullmatch(re.escape(head) + "/" + pattern + r"(?:/[0-9]+)?", a)
            ]
            if candidates:
                return max(
                    candidates,
                    key=lambda a: [int(p) for p in re.split(r"[./]", a.split(head + "/")[1])],
                )
        return None

    def _store(self, arn: str, kind: str, resource: dict) -> None:
        with self.lock:
            self.resources[arn] = resource
            self.kinds[arn] = kind

    def _exists(self, arn: str, operation: str, what: str) -> None:
        if arn in self.resources:
            errors = {e.name for e in self.api.model.operation_model(operation).error_shapes}
            code = (
                "ResourceAlreadyExistsException"
                if "ResourceAlreadyExistsException" in errors
                else "ResourceInUseException"
            )
            raise ApiError(code, f"The {what} {arn} already exists.")

    @staticmethod
    def _semver(version: str) -> None:
        if not SEMVER.fullmatch(version):
            raise ApiError(
                "InvalidVersionNumberException",
                f"The semantic version {version} is not valid: use MAJOR.MINOR.PATCH, without wildcards.",
            )

    def _references(self, resource: dict) -> set[str]:
        """The ARNs a resource names, with `x` wildcard versions resolved as a build would."""
        named = set(re.findall(r"arn:aws[^\"\s]*", json.dumps(resource, default=str)))
        return named | {r for r in map(self._resolve, named) if r}

    def _users(self, arn: str) -> list[str]:
        """ARNs of the resources (and builds in progress) that use ARN."""
        users = []
        with self.lock:
            for other, resource in self.resources.items():
                if other == arn or (
                    self.kinds[other] == "image" and resource["state"]["status"] not in IN_PROGRESS
                ):
                    continue
                if arn in self._references(resource):
                    users.append(other)
        return users

    def _delete(self, request, arn: str, kinds: tuple[str, ...], member: str) -> dict:
        self._get(request, arn, kinds)
        users = self._users(arn)
        if users:
            raise ApiError(
                "ResourceDependencyException", f"The resource {arn} is in use by {users[0]}."
            )
        with self.lock:
            self.resources.pop(arn, None)
            self.kinds.pop(arn, None)
        return {member: arn}

    @staticmethod
    def _page(items: list, params: dict, member: str) -> dict:
        token = params.get("nextToken") or "0"
        if not token.isdigit():
            raise ApiError("InvalidPaginationTokenException", f"The token {token} is invalid.")
        start = int(token)
        size = params.get("maxResults") or 25
        answer = {member: items[start : start + size]}
        if start + size < len(items):
            answer["nextToken"] = str(start + size)
        return answer

    def _listing(self, request, kind: str, params: dict) -> list[dict]:
        scope = f":{request.region}:{request.account}:{kind}/"
        with self.lock:
            found = [
                copy.deepcopy(r)
                for a, r in self.resources.items()
                if scope in a and self.kinds[a] == kind
            ]
        for entry in params.get("filters") or []:
            name, values = entry.get("name"), entry.get("values") or []
            found = [r for r in found if str(r.get(name)) in values]
        return sorted(found, key=lambda r: r["arn"])

    # --- components ----------------------------------------------------------------------------

    def _CreateComponent(self, request, params) -> dict:
        self._semver(params["semanticVersion"])
        data = params.get("data")
        if data is None and params.get("uri"):
            data = self._read_s3(request, params["uri"])
        if data is None:
            raise ApiError(
                "InvalidParameterCombinationException", "One of data or uri is required."
            )
        if params.get("data") and params.get("uri"):
            raise ApiError(
                "InvalidParameterCombinationException", "data and uri cannot be given together."
            )
        document = self._document(data)
        phases = {p.get("name") for p in document.get("phases") or [] if isinstance(p, dict)}
        version_arn = self._arn(request, "component", params["name"], params["semanticVersion"])
        with self.lock:
            if any(a.startswith(version_arn + "/") for a in self.resources):
                self._exists(version_arn + "/1", "CreateComponent", "component")
            arn = version_arn + "/1"
            component = {
                "arn": arn,
                "name": params["name"],
                "version": params["semanticVersion"],
                "description": params.get("description"),
                "changeDescription": params.get("changeDescription"),
                "type": "BUILD"
                if "build" in phases or not phases & {"validate", "test"}
                else "TEST",
                "platform": params["platform"],
                "supportedOsVersions": params.get("supportedOsVersions"),
                "state": {"status": "ACTIVE"},
                "owner": request.account,
                "data": data,
                "kmsKeyId": params.get("kmsKeyId"),
                "encrypted": True,
                "dateCreated": now().isoformat(),
                "tags": params.get("tags") or {},
            }
            self._store(arn, "component", {k: v for k, v in component.items() if v is not None})
        return {"componentBuildVersionArn": arn}

    def _read_s3(self, request, uri: str) -> str:
        found = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
        if not found:
            raise ApiError("InvalidParameterValueException", f"The uri {uri} is not an S3 URI.")
        s3 = self.moto.client("s3", request.region, request.account)
        try:
            return s3.get_object(Bucket=found.group(1), Key=found.group(2))["Body"].read().decode()
        except botocore.exceptions.ClientError as error:
            raise ApiError(
                "InvalidParameterValueException", f"The document at {uri} cannot be read: {error}"
            )

    @staticmethod
    def _document(data: str) -> dict:
        try:
            document = yaml.safe_load(data)
        except yaml.YAMLError as error:
            raise ApiError(
                "InvalidParameterValueException",
                f"The component document is not valid YAML: {error}",
            )
        if not isinstance(document, dict) or not isinstance(document.get("phases"), list):
            raise ApiError(
                "InvalidParameterValueException",
                "The component document must be a mapping with a list of phases.",
            )
        return document

    def _GetComponent(self, request, params) -> dict:
        return {"component": self._get(request, params["componentBuildVersionArn"], ("component",))}

    def _ListComponents(self, request, params) -> dict:
        versions = [
            {
                k: c[k]
                for k in (
                    "arn",
                    "name",
                    "version",
                    "description",
                    "platform",
                    "supportedOsVersions",
                    "type",
                    "owner",
                    "dateCreated",
                )
                if k in c
            }
            for c in self._listing(request, "component", params)
        ]
        for v in versions:
            v["arn"] = v["arn"].rsplit("/", 1)[0]  # the version ARN
        return self._page(versions, params, "componentVersionList")

    def _ListComponentBuildVersions(self, request, params) -> dict:
        prefix = params["componentVersionArn"] + "/"
        found = [c for c in self._listing(request, "component", {}) if c["arn"].startswith(prefix)]
        return self._page(found, params, "componentSummaryList")

    def _DeleteComponent(self, request, params) -> dict:
        return self._delete(
            request, params["componentBuildVersionArn"], ("component",), "componentBuildVersionArn"
        )

    # --- recipes -------------------------------------------------------------------------------

    def _components(self, request, entries: list[dict]) -> list[dict]:
        for entry in entries:
            arn = entry["componentArn"]
            if ":aws:component/" in arn:
                continue
            with self.lock:
                if self._resolve(arn) is None:
                    raise ApiError(
                        "InvalidRequestException", f"The component {arn} does not exist."
                    )
        return entries

    def _parent(self, request, parent: str) -> None:
        if parent.startswith("ami-"):
            ec2 = self.moto.client("ec2", request.region, request.account)
            try:
                ec2.describe_images(ImageIds=[parent])
            except botocore.exceptions.ClientError:
                raise ApiError(
                    "InvalidParameterValueException", f"The parent image {parent} does not exist."
                )

    def _CreateImageRecipe(self, request, params) -> dict:
        self._semver(params["semanticVersion"])
        arn = self._arn(request, "image-recipe", params["name"], params["semanticVersion"])
        with self.lock:
            self._exists(arn, "CreateImageRecipe", "image recipe")
        self._parent(request, params["parentImage"])
        with self.lock:
            recipe = {
                k: v
                for k, v in params.items()
                if k not in ("clientToken", "semanticVersion", "dryRun")
            }
            recipe.update(
                arn=arn,
                type="AMI",
                platform="Linux",
                owner=request.account,
                version=params["semanticVersion"],
                components=self._components(request, params.get("components") or []),
                dateCreated=now().isoformat(),
                tags=params.get("tags") or {},
            )
            self._store(arn, "image-recipe", recipe)
        return {"imageRecipeArn": arn}

    def _GetImageRecipe(self, request, params) -> dict:
        return {"imageRecipe": self._get(request, params["imageRecipeArn"], ("image-recipe",))}

    def _ListImageRecipes(self, request, params) -> dict:
        keys = ("arn", "name", "platform", "owner", "parentImage", "dateCreated", "tags")
        found = [
            {k: r[k] for k in keys if k in r}
            for r in self._listing(request, "image-recipe", params)
        ]
        return self._page(found, params, "imageRecipeSummaryList")

    def _DeleteImageRecipe(self, request, params) -> dict:
        return self._delete(request, params["imageRecipeArn"], ("image-recipe",), "imageRecipeArn")

    def _CreateContainerRecipe(self, request, params) -> dict:
        self._semver(params["semanticVersion"])
        arn = self._arn(request, "container-recipe", params["name"], params["semanticVersion"])
        with self.lock:
            self._exists(arn, "CreateContainerRecipe", "container recipe")
            recipe = {
                k: v
                for k, v in params.items()
                if k not in ("clientToken", "semanticVersion", "dryRun")
            }
            recipe.update(
                arn=arn,
                platform="Linux",
                owner=request.account,
                version=params["semanticVersion"],
                components=self._components(request, params.get("components") or []),
                dateCreated=now().isoformat(),
                tags=params.get("tags") or {},
            )
            self._store(arn, "container-recipe", recipe)
        return {"containerRecipeArn": arn}

    def _GetContainerRecipe(self, request, params) -> dict:
        return {
            "containerRecipe": self._get(
                request, params["containerRecipeArn"], ("container-recipe",)
            )
        }

    def _ListContainerRecipes(self, request, params) -> dict:
        keys = (
            "arn",
            "containerType",
            "name",
            "platform",
            "owner",
            "parentImage",
            "dateCreated",
            "tags",
        )
        found = [
            {k: r[k] for k in keys if k in r}
            for r in self._listing(request, "container-recipe", params)
        ]
        return self._page(found, params, "containerRecipeSummaryList")

    def _DeleteContainerRecipe(self, request, params) -> dict:
        return self._delete(
            request, params["containerRecipeArn"], ("container-recipe",), "containerRecipeArn"
        )

    # --- infrastructure and distribution -------------------------------------------------------

    def _check_infrastructure(self, request, params: dict) -> None:
        """The instance profile, subnet, security groups and key pair must exist in moto."""
        name = params["instanceProfileName"]
        iam = self.moto.client("iam", "us-east-1", request.account)
        ec2 = self.moto.client("ec2", request.region, request.account)
        checks = [
            (f"instance profile {name}", lambda: iam.get_instance_profile(InstanceProfileName=name))
        ]
        if params.get("subnetId"):
            subnet = params["subnetId"]
            checks.append((f"subnet {subnet}", lambda: ec2.describe_subnets(SubnetIds=[subnet])))
        if params.get("securityGroupIds"):
            groups = params["securityGroupIds"]
            checks.append(
                (
                    f"security groups {', '.join(groups)}",
                    lambda: ec2.describe_security_groups(GroupIds=groups),
                )
            )
        if params.get("keyPair"):
            key = params["keyPair"]
            checks.append((f"key pair {key}", lambda: ec2.describe_key_pairs(KeyNames=[key])))
        for what, check in checks:
            try:
                check()
            except botocore.exceptions.ClientError:
                raise ApiError("InvalidParameterValueException", f"The {what} does not exist.")

    def _CreateInfrastructureConfiguration(self, request, params) -> dict:
        self._check_infrastructure(request, params)
        arn = self._arn(request, "infrastructure-configuration", params["name"])
        with self.lock:
            self._exists(arn, "CreateInfrastructureConfiguration", "infrastructure configuration")
            resource = {k: v for k, v in params.items() if k not in ("clientToken", "dryRun")}
            resource.setdefault("terminateInstanceOnFailure", True)
            resource.update(arn=arn, dateCreated=now().isoformat(), tags=params.get("tags") or {})
            self._store(arn, "infrastructure-configuration", resource)
        return {"infrastructureConfigurationArn": arn}

    def _UpdateInfrastructureConfiguration(self, request, params) -> dict:
        arn = params["infrastructureConfigurationArn"]
        old = self._get(request, arn, ("infrastructure-configuration",))
        self._check_infrastructure(request, params)
        resource = {
            k: v
            for k, v in params.items()
            if k not in ("clientToken", "infrastructureConfigurationArn")
        }
        resource.update(
            arn=arn,
            name=old["name"],
            dateCreated=old["dateCreated"],
            dateUpdated=now().isoformat(),
            tags=old.get("tags", {}),
        )
        self._store(arn, "infrastructure-configuration", resource)
        return {"infrastructureConfigurationArn": arn}

    def _GetInfrastructureConfiguration(self, request, params) -> dict:
        arn = params["infrastructureConfigurationArn"]
        return {
            "infrastructureConfiguration": self._get(
                request, arn, ("infrastructure-configuration",)
            )
        }

    def _ListInfrastructureConfigurations(self, request, params) -> dict:
        keys = (
            "arn",
            "name",
            "description",
            "dateCreated",
            "dateUpdated",
            "resourceTags",
            "tags",
            "instanceTypes",
            "instanceProfileName",
        )
        found = [
            {k: r[k] for k in keys if k in r}
            for r in self._listing(request, "infrastructure-configuration", params)
        ]
        return self._page(found, params, "infrastructureConfigurationSummaryList")

    def _DeleteInfrastructureConfiguration(self, request, params) -> dict:
        arn = params["infrastructureConfigurationArn"]
        return self._delete(
            request, arn, ("infrastructure-configuration",), "infrastructureConfigurationArn"
        )

    def _check_distributions(self, request, distributions: list[dict]) -> None:
        regions = [d["region"] for d in distributions]
        if len(set(regions)) != len(regions):
            raise ApiError(
                "InvalidParameterCombinationException",
                "A region appears in more than one distribution.",
            )

    def _CreateDistributionConfiguration(self, request, params) -> dict:
        self._check_distributions(request, params["distributions"])
        arn = self._arn(request, "distribution-configuration", params["name"])
        with self.lock:
            self._exists(arn, "CreateDistributionConfiguration", "distribution configuration")
            resource = {k: v for k, v in params.items() if k not in ("clientToken", "dryRun")}
            resource.update(
                arn=arn,
                timeoutMinutes=720,
                dateCreated=now().isoformat(),
                tags=params.get("tags") or {},
            )
            self._store(arn, "distribution-configuration", resource)
        return {"distributionConfigurationArn": arn}

    def _UpdateDistributionConfiguration(self, request, params) -> dict:
        arn = params["distributionConfigurationArn"]
        old = self._get(request, arn, ("distribution-configuration",))
        self._check_distributions(request, params["distributions"])
        resource = dict(old)
        resource.update(distributions=params["distributions"], dateUpdated=now().isoformat())
        if "description" in params:
            resource["description"] = params["description"]
        self._store(arn, "distribution-configuration", resource)
        return {"distributionConfigurationArn": arn}

    def _GetDistributionConfiguration(self, request, params) -> dict:
        arn = params["distributionConfigurationArn"]
        return {
            "distributionConfiguration": self._get(request, arn, ("distribution-configuration",))
        }

    def _ListDistributionConfigurations(self, request, params) -> dict:
        found = []
        for r in self._listing(request, "distribution-configuration", params):
            summary = {
                k: r[k]
                for k in ("arn", "name", "description", "dateCreated", "dateUpdated", "tags")
                if k in r
            }
            summary["regions"] = [d["region"] for d in r["distributions"]]
            found.append(summary)
        return self._page(found, params, "distributionConfigurationSummaryList")

    def _DeleteDistributionConfiguration(self, request, params) -> dict:
        arn = params["distributionConfigurationArn"]
        return self._delete(
            request, arn, ("distribution-configuration",), "distributionConfigurationArn"
        )

    # --- pipelines -----------------------------------------------------------------------------

    def _check_inputs(self, request, params) -> None:
        """Checks that the recipe, infrastructure and distribution a build or pipeline names exist."""
        if bool(params.get("imageRecipeArn")) == bool(params.get("containerRecipeArn")):
            raise ApiError(
                "InvalidRequestException",
                "Exactly one of imageRecipeArn and containerRecipeArn is required.",
            )
        if params.get("imageRecipeArn"):
            self._get(request, params["imageRecipeArn"], ("image-recipe",))
        else:
            self._get(request, params["containerRecipeArn"], ("container-recipe",))
        self._get(
            request, params["infrastructureConfigurationArn"], ("infrastructure-configuration",)
        )
        if params.get("distributionConfigurationArn"):
            self._get(
                request, params["distributionConfigurationArn"], ("distribution-configuration",)
            )

    def _CreateImagePipeline(self, request, params) -> dict:
        self._check_inputs(request, params)
        arn = self._arn(request, "image-pipeline", params["name"])
        with self.lock:
            self._exists(arn, "CreateImagePipeline", "image pipeline")
            resource = {k: v for k, v in params.items() if k not in ("clientToken", "dryRun")}
            resource.setdefault("status", "ENABLED")
            resource.setdefault("enhancedImageMetadataEnabled", True)
            resource.update(
                arn=arn,
                platform="Linux",
                dateCreated=now().isoformat(),
                tags=params.get("tags") or {},
            )
            self._store(arn, "image-pipeline", resource)
        return {"imagePipelineArn": arn}

    def _UpdateImagePipeline(self, request, params) -> dict:
        arn = params["imagePipelineArn"]
        old = self._get(request, arn, ("image-pipeline",))
        self._check_inputs(request, params)
        if self._running(arn):
            raise ApiError(
                "ResourceInUseException", f"The image pipeline {arn} has a build in progress."
            )
        resource = {k: v for k, v in params.items() if k not in ("clientToken",)}
        resource.update(
            name=old["name"],
            platform="Linux",
            dateCreated=old["dateCreated"],
            dateUpdated=now().isoformat(),
            tags=old.get("tags", {}),
        )
        resource.setdefault("status", old.get("status", "ENABLED"))
        self._store(arn, "image-pipeline", resource)
        return {"imagePipelineArn": arn}

    def _running(self, pipeline_arn: str) -> bool:
        with self.lock:
            return any(
                b.image.get("sourcePipelineArn") == pipeline_arn
                and b.image["state"]["status"] in IN_PROGRESS
                for b in self.builds.values()
            )

    def _GetImagePipeline(self, request, params) -> dict:
        return {
            "imagePipeline": self._get(request, params["imagePipelineArn"], ("image-pipeline",))
        }

    def _ListImagePipelines(self, request, params) -> dict:
        return self._page(
            self._listing(request, "image-pipeline", params), params, "imagePipelineList"
        )

    def _DeleteImagePipeline(self, request, params) -> dict:
        arn = params["imagePipelineArn"]
        if self._running(arn):
            raise ApiError(
                "ResourceDependencyException", f"The image pipeline {arn} has a build in progress."
            )
        return self._delete(request, arn, ("image-pipeline",), "imagePipelineArn")

    def _StartImagePipelineExecution(self, request, params) -> dict:
        pipeline = self._get(request, params["imagePipelineArn"], ("image-pipeline",))
        if pipeline.get("status") == "DISABLED":
            raise ApiError(
                "InvalidRequestException", f"The image pipeline {pipeline['arn']} is disabled."
            )
        arn = self._start(request, pipeline, pipeline)
        with self.lock:
            pipeline["dateLastRun"] = now().isoformat()
        return {"imageBuildVersionArn": arn}

    def _ListImagePipelineImages(self, request, params) -> dict:
        arn = params["imagePipelineArn"]
        self._get(request, arn, ("image-pipeline",))
        found = [
            self._summary(b)
            for b in self._builds(request)
            if b.image.get("sourcePipelineArn") == arn
        ]
        return self._page(found, params, "imageSummaryList")

    # --- images --------------------------------------------------------------------------------

    def _CreateImage(self, request, params) -> dict:
        return {"imageBuildVersionArn": self._start(request, params, None)}

    def _start(self, request, params: dict, pipeline: dict | None) -> str:
        self._check_inputs(request, params)
        container = bool(params.get("containerRecipeArn"))
        if container:
            recipe = self._get(request, params["containerRecipeArn"], ("container-recipe",))
        else:
            recipe = self._get(request, params["imageRecipeArn"], ("image-recipe",))
        infrastructure = self._get(
            request, params["infrastructureConfigurationArn"], ("infrastructure-configuration",)
        )
        distribution = None
        if params.get("distributionConfigurationArn"):
            distribution = self._get(
                request, params["distributionConfigurationArn"], ("distribution-configuration",)
            )
        components = []
        with self.lock:
            for entry in recipe.get("components") or []:
                resolved = self._resolve(entry["componentArn"])
                if resolved:
                    components.append(self.resources[resolved])
            version_arn = self._arn(request, "image", recipe["name"], recipe["version"])
            builds = [a for a in self.builds if a.startswith(version_arn + "/")]
            arn = f"{version_arn}/{len(builds) + 1}"
            tests = (params.get("imageTestsConfiguration") or {}).get("imageTestsEnabled", True)
            image = {
                "arn": arn,
                "type": "DOCKER" if container else "AMI",
                "name": recipe["name"],
                "version": recipe["version"],
                "platform": "Linux",
                "enhancedImageMetadataEnabled": params.get("enhancedImageMetadataEnabled", True),
                "state": {"status": "PENDING"},
                "infrastructureConfiguration": copy.deepcopy(infrastructure),
                "imageTestsConfiguration": params.get("imageTestsConfiguration")
                or {"imageTestsEnabled": True, "timeoutMinutes": 720},
                "dateCreated": now().isoformat(),
                "outputResources": {"amis": [], "containers": []},
                "tags": params.get("tags") or {},
                "buildType": "USER_INITIATED",
                "imageSource": "USER_INITIATED",
                "workflows": params.get("workflows") or [],
            }
            # Copies: the image shows its inputs as they were when it started.
            image["containerRecipe" if container else "imageRecipe"] = copy.deepcopy(recipe)
            if distribution:
                image["distributionConfiguration"] = copy.deepcopy(distribution)
            if pipeline:
                image["sourcePipelineName"] = pipeline["name"]
                image["sourcePipelineArn"] = pipeline["arn"]
            for key in ("executionRole", "loggingConfiguration", "imageScanningConfiguration"):
                if params.get(key):
                    image[key] = params[key]
            build = Build(
                arn=arn,
                account=request.account,
                region=request.region,
                image=image,
                components=components,
                workflows=self._workflows(request),
                tests=bool(tests),
                next_at=time.monotonic() + self.step_seconds,
            )
            self.builds[arn] = build
            self._store(arn, "image", image)
        return arn

    def _workflows(self, request) -> list[Workflow]:
        def workflow(kind: str, name: str, steps) -> Workflow:
            return Workflow(
                id=f"wf-{uuid.uuid4()}",
                kind=kind,
                arn=f"arn:aws:imagebuilder:{request.region}:aws:workflow/{kind.lower()}/{name}/1.0.0/1",
                steps=[Step(f"step-{uuid.uuid4()}", n, a, s) for n, a, s in steps],
            )

        return [
            workflow("BUILD", "build-image", BUILD_STEPS),
            workflow("TEST", "test-image", TEST_STEPS),
        ]

    def _build(self, request, arn: str) -> Build:
        self._get(request, arn, ("image",))
        with self.lock:
            return self.builds[arn]

    def _builds(self, request) -> list[Build]:
        with self.lock:
            return sorted(
                (
                    b
                    for b in self.builds.values()
                    if (b.account, b.region) == (request.account, request.region)
                ),
                key=lambda b: b.arn,
            )

    def _GetImage(self, request, params) -> dict:
        build = self._build(request, params["imageBuildVersionArn"])
        with self.lock:
            return {"image": copy.deepcopy(build.image)}

    def _summary(self, build: Build) -> dict:
        image = build.image
        keys = (
            "arn",
            "name",
            "type",
            "version",
            "platform",
            "state",
            "dateCreated",
            "outputResources",
            "tags",
            "buildType",
            "imageSource",
        )
        summary = {k: copy.deepcopy(image[k]) for k in keys if k in image}
        summary["owner"] = build.account
        return summary

    def _ListImages(self, request, params) -> dict:
        versions: dict[str, dict] = {}
        for build in self._builds(request):
            version_arn = build.arn.rsplit("/", 1)[0]
            summary = self._summary(build)
            versions[version_arn] = {
                "arn": version_arn,
                **{
                    k: summary[k]
                    for k in (
                        "name",
                        "type",
                        "version",
                        "platform",
                        "owner",
                        "dateCreated",
                        "buildType",
                        "imageSource",
                    )
                },
            }
        found = list(versions.values())
        for entry in params.get("filters") or []:
            found = [
                v for v in found if str(v.get(entry.get("name"))) in (entry.get("values") or [])
            ]
        return self._page(found, params, "imageVersionList")

    def _ListImageBuildVersions(self, request, params) -> dict:
        prefix = (params.get("imageVersionArn") or "") + "/"
        found = [self._summary(b) for b in self._builds(request) if b.arn.startswith(prefix)]
        for entry in params.get("filters") or []:
            found = [
                s for s in found if str(s.get(entry.get("name"))) in (entry.get("values") or [])
            ]
        return self._page(found, params, "imageSummaryList")

    def _DeleteImage(self, request, params) -> dict:
        arn = params["imageBuildVersionArn"]
        build = self._build(request, arn)
        if build.image["state"]["status"] in IN_PROGRESS:
            raise ApiError("ResourceDependencyException", f"The image {arn} is still being built.")
        with self.lock:
            self.builds.pop(arn, None)
            self.resources.pop(arn, None)
            self.kinds.pop(arn, None)
        return {"imageBuildVersionArn": arn}

    def _CancelImageCreation(self, request, params) -> dict:
        arn = params["imageBuildVersionArn"]
        build = self._build(request, arn)
        with self.lock:
            status = build.image["state"]["status"]
            if status in ("DISTRIBUTING", "INTEGRATING"):
                raise ApiError(
                    "ResourceInUseException",
                    f"The image {arn} is {status} and cannot be cancelled now.",
                )
            if status not in CANCELLABLE:
                raise ApiError(
                    "InvalidRequestException",
                    f"The image {arn} is {status} and cannot be cancelled.",
                )
            build.image["state"] = {
                "status": "CANCELLED",
                "reason": "Image creation cancelled by the user.",
            }
            moment = now()
            for workflow in build.workflows:
                if workflow.status in ("PENDING", "RUNNING"):
                    workflow.status, workflow.ended = "CANCELLED", moment
                for step in workflow.steps:
                    if step.status in ("PENDING", "RUNNING"):
                        step.status, step.ended = "CANCELLED", moment
        return {"imageBuildVersionArn": arn}

    # --- workflows -----------------------------------------------------------------------------

    @staticmethod
    def _workflow_metadata(workflow: Workflow) -> dict:
        metadata = {
            "workflowBuildVersionArn": workflow.arn,
            "workflowExecutionId": workflow.id,
            "type": workflow.kind,
            "status": workflow.status,
            "totalStepCount": len(workflow.steps),
            "totalStepsSucceeded": sum(s.status == "COMPLETED" for s in workflow.steps),
            "totalStepsFailed": sum(s.status == "FAILED" for s in workflow.steps),
            "totalStepsSkipped": sum(s.status == "SKIPPED" for s in workflow.steps),
        }
        if workflow.message:
            metadata["message"] = workflow.message
        if workflow.started:
            metadata["startTime"] = workflow.started.isoformat()
        if workflow.ended:
            metadata["endTime"] = workflow.ended.isoformat()
        return metadata

    @staticmethod
    def _step_metadata(step: Step) -> dict:
        metadata = {
            "stepExecutionId": step.id,
            "name": step.name,
            "action": step.action,
            "status": step.status,
        }
        if step.message:
            metadata["message"] = step.message
        if step.started:
            metadata["startTime"] = step.started.isoformat()
        if step.ended:
            metadata["endTime"] = step.ended.isoformat()
        return metadata

    def _ListWorkflowExecutions(self, request, params) -> dict:
        arn = params["imageBuildVersionArn"]
        build = self._build(request, arn)
        with self.lock:
            # AWS lists the executions that have started.
            executions = [
                self._workflow_metadata(w) for w in build.workflows if w.status != "PENDING"
            ]
        answer = self._page(executions, params, "workflowExecutions")
        answer["imageBuildVersionArn"] = arn
        return answer

    def _find_workflow(self, request, workflow_id: str) -> tuple[Build, Workflow]:
        for build in self._builds(request):
            for workflow in build.workflows:
                if workflow.id == workflow_id:
                    return build, workflow
        raise ApiError(
            "ResourceNotFoundException",
            f"The workflow execution {workflow_id} does not exist.",
            404,
        )

    def _GetWorkflowExecution(self, request, params) -> dict:
        build, workflow = self._find_workflow(request, params["workflowExecutionId"])
        with self.lock:
            answer = self._workflow_metadata(workflow)
        answer["imageBuildVersionArn"] = build.arn
        return answer

    def _ListWorkflowStepExecutions(self, request, params) -> dict:
        build, workflow = self._find_workflow(request, params["workflowExecutionId"])
        with self.lock:
            steps = [self._step_metadata(s) for s in workflow.steps]
        answer = self._page(steps, params, "steps")
        answer.update(
            workflowBuildVersionArn=workflow.arn,
            workflowExecutionId=workflow.id,
            imageBuildVersionArn=build.arn,
        )
        return answer

    def _GetWorkflowStepExecution(self, request, params) -> dict:
        for build in self._builds(request):
            for workflow in build.workflows:
                for step in workflow.steps:
                    if step.id == params["stepExecutionId"]:
                        with self.lock:
                            answer = self._step_metadata(step)
                        answer.update(
                            workflowBuildVersionArn=workflow.arn,
                            workflowExecutionId=workflow.id,
                            imageBuildVersionArn=build.arn,
                        )
                        return answer
        raise ApiError(
            "ResourceNotFoundException",
            f"The step execution {params['stepExecutionId']} does not exist.",
            404,
        )

    # --- tags ----------------------------------------------------------------------------------

    def _tagged(self, request, arn: str) -> dict:
        with self.lock:
            resolved = arn if arn in self.resources else None
        if resolved is None:
            raise ApiError("ResourceNotFoundException", f"The resource {arn} does not exist.", 404)
        return self._get(request, arn, tuple(KINDS))

    def _TagResource(self, request, params) -> dict:
        resource = self._tagged(request, params["resourceArn"])
        with self.lock:
            resource.setdefault("tags", {}).update(params["tags"])
        return {}

    def _UntagResource(self, request, params) -> dict:
        resource = self._tagged(request, params["resourceArn"])
        with self.lock:
            for key in params["tagKeys"]:
                resource.get("tags", {}).pop(key, None)
        return {}

    def _ListTagsForResource(self, request, params) -> dict:
        resource = self._tagged(request, params["resourceArn"])
        with self.lock:
            return {"tags": dict(resource.get("tags", {}))}

    # --- the build's clock ---------------------------------------------------------------------

    def _clock(self) -> None:
        while True:
            time.sleep(min(self.step_seconds / 4, 0.25))
            moment = time.monotonic()
            with self.lock:
                due = [
                    b
                    for b in self.builds.values()
                    if b.image["state"]["status"] in IN_PROGRESS and b.next_at <= moment
                ]
            for build in due:
                try:
                    self._advance(build)
                except Exception as error:  # a stand-in bug must show, and fail the build visibly
                    import traceback

                    traceback.print_exc()
                    self._fail(build, f"The stand-in failed: {error!r}")

    def _fail(self, build: Build, reason: str, step_name: str | None = None) -> None:
        moment = now()
        with self.lock:
            build.image["state"] = {"status": "FAILED", "reason": reason}
            for workflow in build.workflows:
                for step in workflow.steps:
                    if step.name == step_name or (step_name is None and step.status == "RUNNING"):
                        step.status, step.message, step.ended = "FAILED", reason, moment
                    elif step.status in ("PENDING", "RUNNING"):
                        step.status = "SKIPPED"
                if workflow.status == "RUNNING" or any(
                    s.status == "FAILED" for s in workflow.steps
                ):
                    workflow.status, workflow.message, workflow.ended = "FAILED", reason, moment
                elif workflow.status == "PENDING":
                    workflow.status = "SKIPPED"

    def _enter(self, build: Build, state: str) -> None:
        """Moves a build into STATE: finishes the steps of the state it leaves, starts STATE's."""
        moment = now()
        with self.lock:
            build.image["state"] = {"status": state}
            for workflow in build.workflows:
                for step in workflow.steps:
                    if step.status == "RUNNING" and step.state != state:
                        step.status, step.ended = "COMPLETED", moment
                    if step.status == "PENDING" and step.state == state:
                        step.status, step.started = "RUNNING", moment
                        if workflow.status == "PENDING":
                            workflow.status, workflow.started = "RUNNING", moment
                if workflow.status == "RUNNING" and all(
                    s.status in ("COMPLETED", "SKIPPED") for s in workflow.steps
                ):
                    workflow.status, workflow.ended = "COMPLETED", moment
            build.next_at = time.monotonic() + self.step_seconds

    def _advance(self, build: Build) -> None:
        with self.lock:
            state = build.image["state"]["status"]
            if state not in IN_PROGRESS:
                return
        if state == "BUILDING":
            failing = self._marked(build, FAIL_BUILD_MARKER)
            if failing:
                self._fail(build, self._failure(build, failing, "build"), "ApplyBuildComponents")
                return
            missing = self._missing_download(build)
            if missing:
                self._fail(build, missing, "ApplyBuildComponents")
                return
        if state == "TESTING":
            failing = self._marked(build, FAIL_TEST_MARKER)
            if failing:
                self._fail(build, self._failure(build, failing, "test"), "ApplyTestComponents")
                return
        following = STATES[STATES.index(state) + 1]
        if following == "TESTING" and not build.tests:
            with self.lock:
                for step in build.workflows[1].steps:
                    step.status = "SKIPPED"
                build.workflows[1].status = "SKIPPED"
            following = "DISTRIBUTING"
        if following == "DISTRIBUTING":
            self._enter(build, following)
            try:
                self._distribute(build)
            except botocore.exceptions.ClientError as error:
                self._fail(build, f"Distribution failed: {error}")
            except OSError as error:
                self._fail(build, f"Distribution failed: {error}")
            return
        if following == "INTEGRATING":
            self._enter(build, following)
            try:
                self._integrate(build)
            except botocore.exceptions.ClientError as error:
                self._fail(build, f"Integration failed: {error}")
            return
        self._enter(build, following)

    def _missing_download(self, build: Build) -> str | None:
        """The failure of an `S3Download` step whose object is not in moto's S3, as AWSTOE's
        download fails on the build instance; None when every source is there."""
        for component in build.components:
            try:
                document = yaml.safe_load(component.get("data") or "") or {}
            except yaml.YAMLError:
                continue
            for phase in document.get("phases") or []:
                if phase.get("name") != "build":
                    continue
                for step in phase.get("steps") or []:
                    if step.get("action") != "S3Download":
                        continue
                    for entry in step.get("inputs") or []:
                        found = re.fullmatch(r"s3://([^/]+)/(.+)", str(entry.get("source")))
                        try:
                            if not found:
                                raise ValueError("not an S3 URI")
                            s3 = self.moto.client("s3", build.region, build.account)
                            s3.head_object(Bucket=found.group(1), Key=found.group(2))
                        except (botocore.exceptions.ClientError, ValueError) as error:
                            return (
                                f"Step '{step.get('name')}' of component '{component['arn']}' "
                                f"failed: cannot download {entry.get('source')}: {error}"
                            )
        return None

    def _marked(self, build: Build, marker: str) -> dict | None:
        for component in build.components:
            if marker in component.get("data", ""):
                return component
        return None

    def _failure(self, build: Build, component: dict, phase: str) -> str:
        workflow = build.workflows[0 if phase == "build" else 1]
        return (
            f"Workflow Execution ID: '{workflow.id}' failed with reason: Step "
            f"'Apply{phase.capitalize()}Components' failed: component '{component['arn']}' "
            f"exited with status 1 in its {phase} phase. Logs: "
            f"s3://standin-logs/{build.image['name']}/{build.image['version']}"
        )

    # --- distribution --------------------------------------------------------------------------

    def _ami_name(self, build: Build, template: str | None) -> str:
        date = now().strftime("%Y-%m-%dT%H-%M-%S.%f")[:-3] + "Z"
        if not template:
            return f"{build.image['name']} {date}"
        number = build.arn.rsplit("/", 1)[1]
        return template.replace("{{ imagebuilder:buildDate }}", date).replace(
            "{{ imagebuilder:buildVersion }}", number
        )

    def _distributions(self, build: Build) -> list[dict]:
        configuration = build.image.get("distributionConfiguration")
        distributions = copy.deepcopy((configuration or {}).get("distributions") or [])
        if not any(d["region"] == build.region for d in distributions):
            distributions.insert(0, {"region": build.region})
        return sorted(distributions, key=lambda d: d["region"] != build.region)

    def _distribute(self, build: Build) -> None:
        if build.image["type"] == "DOCKER":
            self._push_container(build)
            return
        home_ec2 = self.moto.client("ec2", build.region, build.account)
        source = None
        amis = []
        for distribution in self._distributions(build):
            region = distribution["region"]
            settings = distribution.get("amiDistributionConfiguration") or {}
            name = self._ami_name(build, settings.get("name"))
            description = (
                settings.get("description") or build.image["imageRecipe"].get("description") or name
            )
            tags = dict(build.image["imageRecipe"].get("amiTags") or {})
            tags.update(settings.get("amiTags") or {})
            tags.update({"CreatedBy": "EC2 Image Builder", "Ec2ImageBuilderArn": build.arn})
            if region == build.region:
                image_id = home_ec2.register_image(
                    Name=name,
                    Description=description,
                    Architecture="x86_64",
                    RootDeviceName="/dev/xvda",
                    VirtualizationType="hvm",
                    BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
                )["ImageId"]
                source = image_id
            else:
                ec2 = self.moto.client("ec2", region, build.account)
                copy_args = {
                    "Name": name,
                    "Description": description,
                    "SourceImageId": source,
                    "SourceRegion": build.region,
                }
                if settings.get("kmsKeyId"):
                    copy_args.update(Encrypted=True, KmsKeyId=settings["kmsKeyId"])
                image_id = ec2.copy_image(**copy_args)["ImageId"]
            ec2 = self.moto.client("ec2", region, build.account)
            self._finish_ami(ec2, image_id, tags, settings.get("launchPermission"))
            amis.append(self._ami(region, image_id, name, description, build.account))
            for account in settings.get("targetAccountIds") or []:
                if account == build.account:
                    continue
                target = self.moto.client("ec2", region, account)
                shared = target.register_image(
                    Name=name,
                    Description=description,
                    Architecture="x86_64",
                    RootDeviceName="/dev/xvda",
                    VirtualizationType="hvm",
                    BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
                )["ImageId"]
                self._finish_ami(target, shared, tags, None)
                amis.append(self._ami(region, shared, name, description, account))
        with self.lock:
            build.amis = amis
            build.image["outputResources"]["amis"] = amis

    @staticmethod
    def _ami(region, image_id, name, description, account) -> dict:
        return {
            "region": region,
            "image": image_id,
            "name": name,
            "description": description,
            "state": {"status": "AVAILABLE"},
            "accountId": account,
        }

    @staticmethod
    def _finish_ami(ec2, image_id: str, tags: dict, permission: dict | None) -> None:
        if tags:
            ec2.create_tags(
                Resources=[image_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
            )
        if permission:
            add = [{"UserId": u} for u in permission.get("userIds") or []]
            add += [{"Group": g} for g in permission.get("userGroups") or []]
            add += [{"OrganizationArn": o} for o in permission.get("organizationArns") or []]
            add += [
                {"OrganizationalUnitArn": o} for o in permission.get("organizationalUnitArns") or []
            ]
            if add:
                ec2.modify_image_attribute(ImageId=image_id, LaunchPermission={"Add": add})

    def _integrate(self, build: Build) -> None:
        for distribution in self._distributions(build):
            region = distribution["region"]

            def image_for(account: str) -> str | None:
                """The AMI as ACCOUNT sees it in this region: its own copy, else the build's."""
                for wanted in (account, build.account):
                    for ami in build.amis:
                        if (ami["region"], ami["accountId"]) == (region, wanted):
                            return ami["image"]
                return None

            for template in distribution.get("launchTemplateConfigurations") or []:
                account = template.get("accountId") or build.account
                ec2 = self.moto.client("ec2", region, account)
                version = ec2.create_launch_template_version(
                    LaunchTemplateId=template["launchTemplateId"],
                    SourceVersion="$Default",
                    LaunchTemplateData={"ImageId": image_for(account)},
                )["LaunchTemplateVersion"]["VersionNumber"]
                if template.get("setDefaultVersion"):
                    ec2.modify_launch_template(
                        LaunchTemplateId=template["launchTemplateId"], DefaultVersion=str(version)
                    )
            for parameter in distribution.get("ssmParameterConfigurations") or []:
                account = parameter.get("amiAccountId") or build.account
                ssm = self.moto.client("ssm", region, account)
                ssm.put_parameter(
                    Name=parameter["parameterName"],
                    Value=image_for(account),
                    Type="String",
                    DataType=parameter.get("dataType") or "text",
                    Overwrite=True,
                )

    def _push_container(self, build: Build) -> None:
        recipe = build.image["containerRecipe"]
        if not self.registry:
            raise OSError("no registry to push to: start the stand-in with --registry HOST:PORT")
        repository = recipe["targetRepository"]["repositoryName"]
        tags = [f"{recipe['version']}-{build.arn.rsplit('/', 1)[1]}"]
        for distribution in self._distributions(build):
            if distribution["region"] == build.region:
                settings = distribution.get("containerDistributionConfiguration") or {}
                tags.extend(t for t in settings.get("containerTags") or [] if t not in tags)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
                "config": {
                    "Labels": {
                        "org.opencontainers.image.base.name": recipe.get("parentImage", ""),
                        "dev.bake.standin.image": build.arn,
                    }
                },
            },
            sort_keys=True,
        ).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        base = f"http://{self.registry}/v2/{repository}"
        start = urllib.request.Request(f"{base}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(start, timeout=30) as answer:
            location = answer.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.registry}{location}"
        separator = "&" if "?" in location else "?"
        upload = urllib.request.Request(
            f"{location}{separator}digest={config_digest}",
            method="PUT",
            data=config,
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(upload, timeout=30).close()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [],
            },
            sort_keys=True,
        ).encode()
        for tag in tags:
            put = urllib.request.Request(
                f"{base}/manifests/{tag}",
                method="PUT",
                data=manifest,
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            )
            urllib.request.urlopen(put, timeout=30).close()
        host = f"{build.account}.dkr.ecr.{build.region}.amazonaws.com"
        with self.lock:
            build.image["outputResources"]["containers"] = [
                {
                    "region": build.region,
                    "imageUris": [f"{host}/{repository}:{tag}" for tag in tags],
                }
            ]


def main(argv: list[str]) -> None:
    parser = standin.common_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--step-seconds", type=float, default=0.5, help="seconds a build spends in each state"
    )
    parser.add_argument("--registry", help="HOST:PORT of the registry container builds push to")
    args = parser.parse_args(argv)
    server = ImageBuilder(args.upstream, args.step_seconds, args.registry)
    standin.serve(args.port, server.handle, args.verbose)


if __name__ == "__main__":
    main(sys.argv[1:])
