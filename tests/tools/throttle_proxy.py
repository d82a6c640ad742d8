#!/usr/bin/env python3
"""A proxy in front of moto that throttles like AWS: per-action request rates, concurrent copies.

moto answers every request at once, so bake's retries, backoff and quota-aware fan-out never meet
a limit there. This proxy forwards every request to moto, byte for byte, after checking it against
the limits AWS documents for the EC2 API:

- Request-rate token buckets, one per account, region and action, sized by the action's category
  as AWS's "Request throttling for the Amazon EC2 API" page lists them (non-mutating,
  unfiltered-and-unpaginated non-mutating, mutating, resource-intensive, uncategorized). An empty
  bucket answers `RequestLimitExceeded` with HTTP 503, as EC2 does. Every bucket can be resized
  per action with `--limits FILE` or `--rate ACTION=CAPACITY:REFILL`.
- At most 20 snapshot copies in flight per account and destination region (`CopyImage`,
  `CopySnapshot`): a copy stays in flight for `--copy-seconds` after moto accepted it; one more
  answers `ResourceLimitExceeded` (HTTP 400). While a copy is in flight, DescribeImages and
  DescribeSnapshots show the copied image `pending` and the copied snapshot `pending` (moto would
  show them finished at once).
- EBS direct `PutSnapshotBlock`: 1,000 requests per second per snapshot; over that,
  `RequestThrottledException` (HTTP 400, Reason `RESOURCE_LEVEL_THROTTLE`), as EBS answers.
- EBS direct snapshots started with `ParentSnapshotId` (moto ignores it) read as AWS documents:
  `ListSnapshotBlocks` and `GetSnapshotBlock` of the child give the parent's blocks (and its
  parent's, down the chain) wherever the child has written none. StartSnapshot checks the parent
  first, as EBS does: `ParentSnapshotId` with `Encrypted` is a `ValidationException`
  (`INVALID_PARAMETER_VALUE`); a parent that does not exist is a `ResourceNotFoundException`
  (HTTP 404, `SNAPSHOT_NOT_FOUND`); a parent started through this proxy and not completed yet is
  a `ValidationException` (`INVALID_DEPENDENCY_REQUEST`); a `VolumeSize` smaller than the
  parent's is a `ValidationException` (`INVALID_VOLUME_SIZE`; a larger volume is allowed, as a
  volume made from a snapshot may be larger). Which snapshot is whose parent is kept for the
  proxy's life (`/_standin/reset` keeps it: it is AWS's state, not a limit).
- EBS direct encryption (moto keeps none): a snapshot started with `KmsKeyArn`, or `Encrypted`
  alone (the account's default EBS key, the AWS-managed `alias/aws/ebs`), or from an encrypted
  parent (the parent's key) shows `Encrypted` and its `KmsKeyId` in DescribeSnapshots; EC2's
  `GetEbsDefaultKmsKeyId` (moto lacks it) answers that default key's ARN.
- Every EC2 and EBS direct request is validated against botocore's model first (see standin.py);
  a bad one is answered as EC2 (`InvalidParameterValue`, `MissingParameter`, `UnknownParameter`) or
  EBS (`ValidationException`) would, and is not forwarded.

Control endpoints (not AWS):

- `GET /_standin/stats[?account=ID]`: JSON `{"actions": {ACTION: {"passed", "throttled",
  "limited", "stalled"}}, "peak_copies": {REGION: N}}`, so a test can assert the limits were hit.
- `POST /_standin/stall?action=PutSnapshotBlock&count=1[&account=ID]`: the next COUNT requests
  for ACTION (of that account, or of any) are held: never forwarded, never answered, until
  `POST /_standin/release` or the proxy stops. ACTION is the name the stats count: the
  operation for EC2 and EBS direct, the `X-Amz-Target` of other JSON services
  (`AmazonEC2ContainerRegistry_V20150921.BatchDeleteImage`), `SERVICE:Action` of other query
  services. This is how a test proves bake's per-request timeout and retry, or kills a run at a
  known request.
- `POST /_standin/limits?account=ID` with a JSON body in the `--limits` format: the limits for
  that account from now on (its buckets start full), so that tests sharing one proxy each set
  their own.
- `POST /_standin/reset`: forgets stats, buckets, copies, stalls and per-account limits.

`--aws-block-size` also rewrites StartSnapshot's `BlockSize` from moto's 512 to AWS's 524288 (what
scripts/ebs-block-size-proxy.py does for the upload benchmark); with `--unlimited` no limit applies,
so `--unlimited --aws-block-size` does that script's job (requests still validated and counted).

Not modelled: the per-resource rate limits (AttachVolume and friends), the account-wide limits of
other services (they pass through uncounted except in stats), the EBS direct account-level
request quotas other than PutSnapshotBlock's per-snapshot rate, `Throttling` answers of
query-protocol services other than EC2, the time-based copy duration
(`SnapshotCopyCompletionDurationMinutes` is passed to moto, the modelled duration stays
`--copy-seconds`), and the size of a snapshot (every copy takes the same time). Of EBS direct
parents: refusals for the parent's encryption (a child is never refused for its parent's key,
nor for an unencrypted parent under encryption by default), `ModifyEbsDefaultKmsKeyId` (the
default key stays `alias/aws/ebs`), the encryption of snapshots made other than by StartSnapshot
(as moto keeps it), `ListChangedBlocks` between a child and its
parent (moto compares only the blocks each snapshot wrote itself), parents in other accounts,
block tokens (any token is accepted for a block, as moto accepts it; moto's tokens, UUIDs that
EBS's model refuses, are answered without their dashes) and `ExpiryTime`.

Usage: throttle_proxy.py --upstream http://127.0.0.1:MOTO_PORT [--port 0] [--limits FILE]
       [--rate ACTION=CAPACITY:REFILL]... [--max-copies 20] [--copy-seconds 5] [--aws-block-size]
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import botocore.exceptions

import standin
from standin import ApiError, Request, Response

# AWS's EC2 buckets by action category: (capacity, refill per second), one bucket per account,
# region and action ("each API is evaluated individually"). The non-mutating 100/20 is the example
# AWS's throttling page spells out; the others are its table's values as of writing. Any of them
# can be overridden with --limits or --rate.
CATEGORY_BUCKETS = {
    "non-mutating": (100, 20),
    "unfiltered": (50, 10),
    "mutating": (200, 5),
    "resource-intensive": (50, 5),
    "uncategorized": (50, 5),
}
# The actions AWS lists as resource-intensive.
RESOURCE_INTENSIVE = {
    "AcceptVpcPeeringConnection",
    "AuthorizeSecurityGroupIngress",
    "CancelSpotFleetRequests",
    "CopyImage",
    "CreateKeyPair",
    "CreateManagedPrefixList",
    "CreateNetworkAcl",
    "CreateNetworkAclEntry",
    "CreateNetworkInterface",
    "CreateRoute",
    "CreateSecurityGroup",
    "CreateSnapshot",
    "CreateSnapshots",
    "CreateSubnet",
    "CreateVolume",
    "CreateVpc",
    "CreateVpcPeeringConnection",
    "DeleteNetworkAclEntry",
    "DeleteRoute",
    "DeleteSecurityGroup",
    "DeleteSnapshot",
    "DetachVolume",
    "ModifyInstanceAttribute",
    "ModifySnapshotAttribute",
    "RegisterImage",
    "ReplaceNetworkAclEntry",
    "RevokeSecurityGroupIngress",
    "RunInstances",
    "StartInstances",
    "StopInstances",
    "TerminateInstances",
}
# Describe calls that AWS counts as "unfiltered and unpaginated" when they carry neither.
UNFILTERED_CANDIDATES = {
    "DescribeImages",
    "DescribeInstances",
    "DescribeNetworkInterfaces",
    "DescribeSecurityGroups",
    "DescribeSnapshots",
    "DescribeSpotInstanceRequests",
    "DescribeVolumes",
}
# AWS's limit of snapshot copies in flight per destination region.
MAX_CONCURRENT_COPIES = 20
# EBS direct: PutSnapshotBlock requests per second per snapshot (AWS's quota).
PUT_SNAPSHOT_BLOCK_RATE = 1000
# How long a modelled snapshot copy stays in flight, unless told otherwise: long enough for a
# waiter to see `pending`, short enough for a test.
COPY_SECONDS = 5.0
AWS_BLOCK_SIZE = 524288
COPY_ACTIONS = {"CopyImage", "CopySnapshot"}


def category(action: str, params: dict) -> str:
    if action in RESOURCE_INTENSIVE:
        return "resource-intensive"
    if action.startswith(("Describe", "Get", "List", "Search")):
        if action in UNFILTERED_CANDIDATES and not (
            params.get("Filters") or params.get("MaxResults") or _has_ids(params)
        ):
            return "unfiltered"
        return "non-mutating"
    if action.startswith(
        ("Create", "Delete", "Modify", "Register", "Deregister", "Associate", "Disassociate")
    ) or action.startswith(("Enable", "Disable", "Attach", "Detach", "Copy", "Import", "Reset")):
        return "mutating"
    return "uncategorized"


def _has_ids(params: dict) -> bool:
    return any(key.endswith("Ids") and value for key, value in params.items())


class Bucket:
    """A token bucket: CAPACITY tokens, refilled at REFILL per second."""

    def __init__(self, capacity: float, refill: float):
        self.capacity = capacity
        self.refill = refill
        self.tokens = capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        moment = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (moment - self.stamp) * self.refill)
        self.stamp = moment
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class Copy:
    kind: str  # "image" or "snapshot"
    resource_id: str
    until: float


@dataclass
class Limits:
    """The limits in force for an account: AWS's defaults, as overridden by flags or a test."""

    categories: dict[str, tuple[float, float]]
    actions: dict[str, tuple[float, float]]
    max_copies: int
    copy_seconds: float
    # PutSnapshotBlock's bucket per snapshot: (capacity, refill per second).
    block_rate: tuple[float, float]

    @classmethod
    def parse(cls, document: dict) -> "Limits":
        """Limits from the JSON document `--limits` and `POST /_standin/limits` take."""
        known = {"categories", "actions", "max_copies", "copy_seconds", "put_snapshot_block_rate"}
        unknown = set(document) - known
        if unknown:
            raise ValueError(f"unknown limits {sorted(unknown)}; known: {sorted(known)}")
        categories = dict(CATEGORY_BUCKETS)
        for name, bucket in (document.get("categories") or {}).items():
            if name not in CATEGORY_BUCKETS:
                raise ValueError(f"unknown category {name!r}; known: {sorted(CATEGORY_BUCKETS)}")
            categories[name] = _bucket(bucket)
        return cls(
            categories=categories,
            actions={k: _bucket(v) for k, v in (document.get("actions") or {}).items()},
            max_copies=int(document.get("max_copies", MAX_CONCURRENT_COPIES)),
            copy_seconds=float(document.get("copy_seconds", COPY_SECONDS)),
            block_rate=_block_rate(document.get("put_snapshot_block_rate", PUT_SNAPSHOT_BLOCK_RATE)),
        )


def _block_rate(value) -> tuple[float, float]:
    """A rate N (AWS's shape: N a second, N at once), or [CAPACITY, REFILL] for tests that must
    not depend on how fast the machine sends."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    return _bucket(value)


def _bucket(value) -> tuple[float, float]:
    capacity, refill = value
    return float(capacity), float(refill)


class ThrottleProxy:
    def __init__(self, upstream: str, limits: dict, aws_block_size: bool, unlimited: bool = False):
        self.upstream = upstream
        self.unlimited = unlimited
        self.ec2 = standin.Api("ec2")
        self.ebs = standin.Api("ebs")
        self.defaults = Limits.parse(limits)
        self.aws_block_size = aws_block_size
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.moto = standin.Moto(upstream)
        # EBS direct lineage, per (account, region, snapshot id): the parent each child was
        # started from, the snapshots started here and not completed yet, and the blocks
        # (index -> token) of completed snapshots, which no longer change.
        self.parents: dict[tuple[str, str, str], str] = {}
        self.pending_snapshots: set[tuple[str, str, str]] = set()
        self.sealed_blocks: dict[tuple[str, str, str], dict[int, str]] = {}
        # The KMS key ARN of each encrypted EBS direct snapshot started here (moto keeps none).
        self.encryption: dict[tuple[str, str, str], str] = {}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.buckets: dict[tuple, Bucket] = {}
            self.copies: dict[tuple[str, str], list[Copy]] = defaultdict(list)
            self.peak: dict[tuple[str, str], int] = defaultdict(int)
            self.stats: dict[tuple[str, str], dict[str, int]] = defaultdict(
                lambda: {"passed": 0, "throttled": 0, "limited": 0, "stalled": 0}
            )
            # Held requests to come, per (action, account or None for any account).
            self.stalls: dict[tuple[str, str | None], int] = {}
            self.limits: dict[str, Limits] = {}  # per account, set by a test
            self.release.set()
            self.release = threading.Event()

    def _count(self, account: str, action: str, outcome: str) -> None:
        with self.lock:
            self.stats[(account, action)][outcome] += 1

    # The control endpoints.

    def control(self, request: Request) -> Response:
        query = request.query
        if request.path == "/_standin/stats" and request.method == "GET":
            account = query.get("account", [None])[0]
            actions: dict[str, dict[str, int]] = {}
            peaks: dict[str, int] = {}
            with self.lock:
                for (acct, action), counts in self.stats.items():
                    if account in (None, acct):
                        total = actions.setdefault(action, dict.fromkeys(counts, 0))
                        for key, value in counts.items():
                            total[key] += value
                for (acct, region), peak in self.peak.items():
                    if account in (None, acct):
                        peaks[region] = max(peaks.get(region, 0), peak)
            return standin.json_response(200, {"actions": actions, "peak_copies": peaks})
        if request.path == "/_standin/stall" and request.method == "POST":
            action = query.get("action", [""])[0]
            count = int(query.get("count", ["1"])[0])
            key = (action, query.get("account", [None])[0])
            with self.lock:
                self.stalls[key] = self.stalls.get(key, 0) + count
                pending = self.stalls[key]
            return standin.json_response(200, {"action": action, "pending": pending})
        if request.path == "/_standin/limits" and request.method == "POST":
            account = query.get("account", [None])[0]
            if not account:
                return standin.json_response(400, {"message": "limits are set per ?account=ID"})
            try:
                limits = Limits.parse(json.loads(request.body or b"{}"))
            except (ValueError, TypeError) as error:
                return standin.json_response(400, {"message": f"bad limits: {error}"})
            with self.lock:
                self.limits[account] = limits
                # Buckets sized by the old limits go; the account starts full at the new ones.
                self.buckets = {k: v for k, v in self.buckets.items() if k[0] != account}
            return standin.json_response(200, {"account": account, "limits": asdict(limits)})
        if request.path == "/_standin/release" and request.method == "POST":
            with self.lock:
                self.stalls.clear()
                self.release.set()
                self.release = threading.Event()
            return standin.json_response(200, {"released": True})
        if request.path == "/_standin/reset" and request.method == "POST":
            self.reset()
            return standin.json_response(200, {"reset": True})
        return standin.json_response(404, {"message": f"no control endpoint {request.path}"})

    # Requests for AWS.

    def handle(self, request: Request) -> Response | None:
        if request.path.startswith("/_standin/"):
            return self.control(request)
        service = request.signing_service
        api = {"ec2": self.ec2, "ebs": self.ebs}.get(service or "")
        if api is None:
            # Counted by what the request calls: query protocols' Action, JSON's target.
            action = request.form().get("Action") if request.method == "POST" else None
            name = request.headers.get("X-Amz-Target") or f"{service}:{action or request.method}"
            stalled = self._take_stall(name, request.account)
            if stalled is not None:
                self._count(request.account, name, "stalled")
                stalled.wait()  # held until released or the proxy stops
                return None
            self._count(request.account, name, "passed")
            return standin.forward(self.upstream, request)
        try:
            found = api.parse_and_validate(request)
        except ApiError as error:
            return api.error(error)
        if found is None:
            return standin.forward(self.upstream, request)
        operation, params = found
        action = operation.name
        account, region = request.account, request.region

        stalled = self._take_stall(action, account)
        if stalled is not None:
            self._count(account, action, "stalled")
            stalled.wait()  # held until released or the proxy stops
            return None

        try:
            if not self.unlimited:
                self._admit(api, account, region, action, params)
            if action == "GetEbsDefaultKmsKeyId":  # moto lacks it
                self._count(account, action, "passed")
                return self.ec2.respond(operation, {"KmsKeyId": self._default_key(account, region)})
            if api is self.ebs:
                answered = self._lineage(operation, account, region, params, request)
                if answered is not None:
                    self._count(account, action, "passed")
                    return answered
        except ApiError as error:
            return api.error(error)

        response = None
        try:
            response = standin.forward(self.upstream, request)
        finally:
            if action in COPY_ACTIONS and (response is None or response.status >= 300):
                self._forget_copy(account, region)
        self._count(account, action, "passed")
        if response.status < 300:
            response = self._after(account, region, action, params, response)
        return response

    def _forget_copy(self, account: str, region: str) -> None:
        """A copy moto refused never started: it frees its slot."""
        with self.lock:
            copies = self.copies[(account, region)]
            for index, copy in enumerate(copies):
                if copy.kind == "pending":
                    del copies[index]
                    break

    def _take_stall(self, action: str, account: str) -> threading.Event | None:
        with self.lock:
            for key in ((action, account), (action, None)):
                if self.stalls.get(key, 0) > 0:
                    self.stalls[key] -= 1
                    return self.release
        return None

    def _admit(self, api, account, region, action, params) -> None:
        """Raises the AWS error for a request over a limit; else takes its token."""
        with self.lock:
            limits = self.limits.get(account, self.defaults)
            if api is self.ebs:
                if action == "PutSnapshotBlock":
                    key = (account, region, action, params.get("SnapshotId"))
                    bucket = self.buckets.setdefault(key, Bucket(*limits.block_rate))
                    if not bucket.take():
                        self.stats[(account, action)]["throttled"] += 1
                        raise ApiError(
                            "RequestThrottledException",
                            "The request uses more than the allowed rate for this snapshot",
                            fields={"Reason": "RESOURCE_LEVEL_THROTTLE"},
                        )
                return
            capacity, refill = (
                limits.actions.get(action) or limits.categories[category(action, params)]
            )
            bucket = self.buckets.setdefault((account, region, action), Bucket(capacity, refill))
            if not bucket.take():
                self.stats[(account, action)]["throttled"] += 1
                raise ApiError("RequestLimitExceeded", "Request limit exceeded.", status=503)
            if action in COPY_ACTIONS:
                in_flight = self._in_flight(account, region)
                if len(in_flight) >= limits.max_copies:
                    self.stats[(account, action)]["limited"] += 1
                    raise ApiError(
                        "ResourceLimitExceeded",
                        f"Too many snapshot copies in progress. The limit is {limits.max_copies} "
                        "for this destination region.",
                    )
                # Counted now, so that concurrent requests cannot all slip under the limit;
                # the resource id is filled in from moto's answer.
                in_flight.append(Copy("pending", "", time.monotonic() + limits.copy_seconds))
                self.peak[(account, region)] = max(self.peak[(account, region)], len(in_flight))

    def _in_flight(self, account: str, region: str) -> list[Copy]:
        moment = time.monotonic()
        alive = [c for c in self.copies[(account, region)] if c.until > moment]
        self.copies[(account, region)] = alive
        return alive

    def _after(self, account, region, action, params, response: Response) -> Response:
        """Rewrites moto's answers where AWS's would differ (copies in flight, block size)."""
        body = response.body
        if action in COPY_ACTIONS:
            tag = "imageId" if action == "CopyImage" else "snapshotId"
            found = re.search(rf"<{tag}>([^<]+)</{tag}>".encode(), body)
            with self.lock:
                for copy in self.copies[(account, region)]:
                    if copy.kind == "pending":
                        copy.kind = "image" if action == "CopyImage" else "snapshot"
                        copy.resource_id = found.group(1).decode() if found else ""
                        break
        elif action in ("DescribeImages", "DescribeSnapshots"):
            with self.lock:
                pending = [c for c in self._in_flight(account, region) if c.resource_id]
            for copy in pending:
                body = _mark_pending(body, copy)
            if action == "DescribeSnapshots":
                with self.lock:
                    here = (account, region)
                    keys = {k[2]: v for k, v in self.encryption.items() if k[:2] == here}
                for snapshot, key in keys.items():
                    body = _mark_encrypted(body, snapshot, key)
        elif action == "StartSnapshot":
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            snapshot = answer.get("SnapshotId") if isinstance(answer, dict) else None
            if snapshot:
                key = self._encryption_of_new(account, region, params)
                with self.lock:
                    self.pending_snapshots.add((account, region, snapshot))
                    if params.get("ParentSnapshotId"):
                        self.parents[(account, region, snapshot)] = params["ParentSnapshotId"]
                    if key:
                        self.encryption[(account, region, snapshot)] = key
            if self.aws_block_size and isinstance(answer, dict) and answer.get("BlockSize") == 512:
                answer["BlockSize"] = AWS_BLOCK_SIZE
                body = json.dumps(answer).encode()
        elif action in ("ListSnapshotBlocks", "ListChangedBlocks"):
            body = _aws_block_tokens(body)
        elif action == "CompleteSnapshot":
            with self.lock:
                self.pending_snapshots.discard((account, region, params.get("SnapshotId")))
        response.body = body
        return response

    # EBS direct snapshots with parents.

    def _lineage(self, operation, account, region, params, request: Request) -> Response | None:
        """Answers what moto would get wrong about parents; None: forward the request."""
        action = operation.name
        if action == "StartSnapshot" and params.get("ParentSnapshotId"):
            self._check_parent(account, region, params)
            return None
        if action not in ("ListSnapshotBlocks", "GetSnapshotBlock"):
            return None
        chain = self._chain(account, region, params["SnapshotId"])
        if len(chain) == 1:
            return None  # no parent: moto's own answer is right
        if action == "ListSnapshotBlocks":
            return self._list_blocks(operation, account, region, chain, params)
        index = params["BlockIndex"]
        for snapshot in chain:
            if index in self._blocks(account, region, snapshot):
                if snapshot == chain[0]:
                    return None
                child, owner = f"/snapshots/{chain[0]}/", f"/snapshots/{snapshot}/"
                path = request.raw_path.replace(child, owner, 1)
                return standin.forward(
                    self.upstream, Request(request.method, path, request.headers, request.body)
                )
        raise ApiError(
            "ValidationException",
            f"The block {index} is not in snapshot {chain[0]} or its parents",
            fields={"Reason": "INVALID_BLOCK"},
        )

    def _check_parent(self, account, region, params) -> None:
        parent = params["ParentSnapshotId"]
        if "Encrypted" in params:
            raise ApiError(
                "ValidationException",
                "You can't specify ParentSnapshotId and Encrypted in the same request",
                fields={"Reason": "INVALID_PARAMETER_VALUE"},
            )
        ec2 = self.moto.client("ec2", region, account)
        try:
            found = ec2.describe_snapshots(SnapshotIds=[parent])["Snapshots"]
        except botocore.exceptions.ClientError:
            found = []
        if not found:
            raise ApiError(
                "ResourceNotFoundException",
                f"The snapshot {parent} does not exist",
                status=404,
                fields={"Reason": "SNAPSHOT_NOT_FOUND"},
            )
        with self.lock:
            pending = (account, region, parent) in self.pending_snapshots
        state = "pending" if pending else found[0].get("State")
        if state != "completed":
            raise ApiError(
                "ValidationException",
                f"The parent snapshot {parent} is {state}, not completed",
                fields={"Reason": "INVALID_DEPENDENCY_REQUEST"},
            )
        size = found[0].get("VolumeSize") or 0
        if params["VolumeSize"] < size:
            raise ApiError(
                "ValidationException",
                f"The volume size {params['VolumeSize']} GiB is smaller than the parent "
                f"snapshot's {size} GiB",
                fields={"Reason": "INVALID_VOLUME_SIZE"},
            )

    def _encryption_of_new(self, account, region, params) -> str | None:
        """The KMS key ARN a snapshot StartSnapshot makes is encrypted with (None: unencrypted),
        as EBS decides it: a child has its parent's; else `KmsKeyArn`, or with `Encrypted` alone
        the account's default EBS key."""
        parent = params.get("ParentSnapshotId")
        if parent:
            with self.lock:
                known = self.encryption.get((account, region, parent))
            if known:
                return known
            ec2 = self.moto.client("ec2", region, account)
            try:
                found = ec2.describe_snapshots(SnapshotIds=[parent])["Snapshots"]
            except botocore.exceptions.ClientError:
                return None
            return found[0].get("KmsKeyId") if found and found[0].get("Encrypted") else None
        if params.get("KmsKeyArn"):
            return params["KmsKeyArn"]
        if params.get("Encrypted"):
            return self._default_key(account, region)
        return None

    def _default_key(self, account, region) -> str:
        """The ARN of the account's default EBS key (AWS-managed `alias/aws/ebs`). moto makes it
        when an encrypted volume names no key, so one such volume is made and deleted again."""
        kms = self.moto.client("kms", region, account)
        try:
            return kms.describe_key(KeyId="alias/aws/ebs")["KeyMetadata"]["Arn"]
        except botocore.exceptions.ClientError:
            pass
        ec2 = self.moto.client("ec2", region, account)
        volume = ec2.create_volume(AvailabilityZone=f"{region}a", Size=1, Encrypted=True)
        ec2.delete_volume(VolumeId=volume["VolumeId"])
        return volume["KmsKeyId"]

    def _chain(self, account, region, snapshot) -> list[str]:
        """The snapshot, its parent, the parent's parent..."""
        chain = [snapshot]
        with self.lock:
            while parent := self.parents.get((account, region, chain[-1])):
                if parent in chain:
                    break
                chain.append(parent)
        return chain

    def _blocks(self, account, region, snapshot) -> dict[int, str]:
        """The blocks moto holds for the snapshot itself (none for one it has no data of)."""
        key = (account, region, snapshot)
        with self.lock:
            if key in self.sealed_blocks:
                return self.sealed_blocks[key]
            pending = key in self.pending_snapshots
        ebs = self.moto.client("ebs", region, account)
        try:
            listed = ebs.list_snapshot_blocks(SnapshotId=snapshot)["Blocks"]
        except botocore.exceptions.ClientError:
            listed = []  # made by EC2 (CreateSnapshot, CopySnapshot): moto has no blocks
        blocks = {b["BlockIndex"]: _aws_block_token(b["BlockToken"]) for b in listed}
        if not pending:
            with self.lock:
                self.sealed_blocks[key] = blocks
        return blocks

    def _list_blocks(self, operation, account, region, chain, params) -> Response:
        merged: dict[int, str] = {}
        for snapshot in reversed(chain):  # the child's own blocks last: they win
            merged.update(self._blocks(account, region, snapshot))
        start = params.get("StartingBlockIndex", 0)
        token = params.get("NextToken")
        if token is not None:
            if not token.isdigit():
                raise ApiError(
                    "ValidationException",
                    "The pagination token is invalid",
                    fields={"Reason": "INVALID_PAGE_TOKEN"},
                )
            start = int(token)
        limit = params.get("MaxResults", 10000)
        indexes = [i for i in sorted(merged) if i >= start]
        page, rest = indexes[:limit], indexes[limit:]
        ebs = self.moto.client("ebs", region, account)
        own = ebs.list_snapshot_blocks(SnapshotId=chain[0])
        result = {
            "Blocks": [{"BlockIndex": i, "BlockToken": merged[i]} for i in page],
            "VolumeSize": own["VolumeSize"],
            "BlockSize": AWS_BLOCK_SIZE if self.aws_block_size else own["BlockSize"],
        }
        if rest:
            result["NextToken"] = str(rest[0])
        return self.ebs.respond(operation, result)


def _aws_block_token(token: str) -> str:
    """moto's block token (a UUID) in the alphabet EBS's model allows (`[A-Za-z0-9+/=]`): a
    client that validates requests (boto3) could not send moto's own token back."""
    return token.replace("-", "")


def _aws_block_tokens(body: bytes) -> bytes:
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    if not isinstance(answer, dict):
        return body
    for block in answer.get("Blocks") or answer.get("ChangedBlocks") or []:
        for key in ("BlockToken", "FirstBlockToken", "SecondBlockToken"):
            if isinstance(block.get(key), str):
                block[key] = _aws_block_token(block[key])
    return json.dumps(answer).encode()


def _mark_encrypted(body: bytes, snapshot: str, key: str) -> bytes:
    """Shows a snapshot encrypted with KEY in a DescribeSnapshots answer (the members after
    `snapshotId` in moto's item hold no nested item)."""
    start = body.find(f"<snapshotId>{snapshot}</snapshotId>".encode())
    if start < 0:
        return body
    end = body.find(b"</item>", start)
    segment = re.sub(rb"<kmsKeyId>[^<]*</kmsKeyId>", b"", body[start:end])
    encrypted = f"<encrypted>true</encrypted><kmsKeyId>{key}</kmsKeyId>".encode()
    segment, count = re.subn(rb"<encrypted>[^<]*</encrypted>", encrypted, segment)
    if not count:
        segment += encrypted
    return body[:start] + segment + body[end:]


def _mark_pending(body: bytes, copy: Copy) -> bytes:
    """Shows a copy in flight as AWS does: the image `pending`, the snapshot `pending` at 0%."""
    if copy.kind == "image":
        start = body.find(f"<imageId>{copy.resource_id}</imageId>".encode())
        if start < 0:
            return body
        state = body.find(b"<imageState>available</imageState>", start)
        following = body.find(b"<imageId>", start + 1)
        if state < 0 or (0 <= following < state):
            return body
        return body[:state] + b"<imageState>pending</imageState>" + body[state + 34 :]
    start = body.find(f"<snapshotId>{copy.resource_id}</snapshotId>".encode())
    if start < 0:
        return body
    end = body.find(b"</item>", start)
    segment = body[start:end]
    segment = segment.replace(b"<status>completed</status>", b"<status>pending</status>")
    segment = re.sub(rb"<progress>[^<]*</progress>", b"<progress>0%</progress>", segment)
    return body[:start] + segment + body[end:]


def parse_rate(text: str) -> tuple[str, tuple[float, float]]:
    action, _, numbers = text.partition("=")
    capacity, _, refill = numbers.partition(":")
    if not action or not capacity or not refill:
        raise SystemExit(f"--rate wants ACTION=CAPACITY:REFILL, not {text!r}")
    return action, (float(capacity), float(refill))


def main(argv: list[str]) -> None:
    parser = standin.common_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--limits",
        help="JSON file: categories, actions, max_copies, copy_seconds, put_snapshot_block_rate",
    )
    parser.add_argument("--rate", action="append", default=[], help="ACTION=CAPACITY:REFILL")
    parser.add_argument("--max-copies", type=int, help="copies in flight per destination region")
    parser.add_argument("--copy-seconds", type=float, help="how long a copy stays in flight")
    parser.add_argument(
        "--aws-block-size", action="store_true", help="answer StartSnapshot with 524288"
    )
    parser.add_argument(
        "--unlimited", action="store_true", help="no limits: validate, count and forward only"
    )
    args = parser.parse_args(argv)
    limits: dict = {}
    if args.limits:
        with open(args.limits) as file:
            limits = json.load(file)
    limits.setdefault("actions", {}).update(dict(parse_rate(r) for r in args.rate))
    if args.max_copies is not None:
        limits["max_copies"] = args.max_copies
    if args.copy_seconds is not None:
        limits["copy_seconds"] = args.copy_seconds
    try:
        proxy = ThrottleProxy(args.upstream, limits, args.aws_block_size, args.unlimited)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"throttle_proxy.py: bad limits: {error}")
    standin.serve(args.port, proxy.handle, args.verbose)


if __name__ == "__main__":
    main(sys.argv[1:])
