"""Tests of the AWS stand-ins (tests/tools/*_standin.py, throttle_proxy.py) against a real moto.

Run with the test venv's pytest: `VENV/bin/python -m pytest tests/tools` (scripts/setup builds the
venv). The suite starts its own moto_server (from the venv that runs it) and each stand-in on free
127.0.0.1 ports and stops them by PID. The requests come from boto3, whose serializers and parsers
are independent of the stand-ins' own, so a protocol mistake on either side shows. Each test uses
its own 12-digit account (`x-moto-account-id`), so tests never see each other's state.

Under `CI`, a missing moto_server or registry fails the suite instead of skipping.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers
import botocore.serialize
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import standin  # noqa: E402

READY_TIMEOUT = 30  # seconds for a server to answer
STOP_TIMEOUT = 10  # seconds between SIGTERM and SIGKILL
_accounts = itertools.count(int(time.time()) % 10_000 * 10_000)


def missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: run scripts/setup")
    pytest.skip(f"{what} is missing: run scripts/setup")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_http(url: str, process: subprocess.Popen, want: int = 200) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == want:
                    return
        except urllib.error.HTTPError as error:
            if error.code == want:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer {want} within {READY_TIMEOUT}s")


@pytest.fixture(scope="session")
def moto():
    binary = pathlib.Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        missing(f"moto_server next to {sys.executable}")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        env = dict(os.environ, MOTO_EC2_LOAD_DEFAULT_AMIS="false")
        log = open(pathlib.Path(workdir) / "moto.log", "w")
        process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/moto-api/", process)
            yield url
        finally:
            stop(process)
            log.close()


def start_standin(script: str, *arguments: str):
    process = subprocess.Popen(
        [sys.executable, str(HERE / script), *arguments], stdout=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    if not line.strip().isdigit():
        stop(process)
        raise RuntimeError(f"{script} printed {line!r} instead of its port")
    url = f"http://127.0.0.1:{int(line)}"
    wait_http(f"{url}/_standin/ready", process)
    return process, url


@pytest.fixture(scope="module")
def throttle(moto, tmp_path_factory):
    limits = tmp_path_factory.mktemp("throttle") / "limits.json"
    # Three at once, then one every 100 s: the fourth is refused however slowly requests come.
    limits.write_text(json.dumps({"put_snapshot_block_rate": [3, 0.01]}))
    process, url = start_standin(
        "throttle_proxy.py",
        "--upstream",
        moto,
        "--limits",
        str(limits),
        "--rate",
        "DescribeRegions=2:0.01",
        "--max-copies",
        "2",
        # Long enough that a loaded machine sends the test's three copies well inside it.
        "--copy-seconds",
        "12",
        "--aws-block-size",
    )
    yield url
    stop(process)


@pytest.fixture(scope="module")
def asg_ecs(moto):
    process, url = start_standin(
        "asg_ecs_standin.py", "--upstream", moto, "--tick", "0.1", "--time-scale", "0.001"
    )
    yield url
    stop(process)


@pytest.fixture(scope="module")
def registry():
    address = os.environ.get("BAKE_TEST_REGISTRY")
    if address:
        yield address
        return
    binary = shutil.which("docker-registry")
    if binary is None:
        missing("docker-registry")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        config = pathlib.Path(workdir) / "config.yml"
        config.write_text(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {workdir}/data\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/v2/", process)
            yield f"127.0.0.1:{port}"
        finally:
            stop(process)


@pytest.fixture(scope="module")
def imagebuilder(moto, registry):
    process, url = start_standin(
        "imagebuilder_standin.py",
        "--upstream",
        moto,
        "--step-seconds",
        "0.1",
        "--registry",
        registry,
    )
    yield url
    stop(process)


@pytest.fixture
def account() -> str:
    return f"{next(_accounts):012d}"


def client(endpoint: str, service: str, account: str, region: str = "us-east-1", **config):
    """A boto3 client for ENDPOINT in ACCOUNT, without retries: each request is seen once."""
    options = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    options.update(config)
    made = boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(**options),
    )
    made.meta.events.register(
        "before-sign",
        lambda request, **_: request.headers.__setitem__(standin.ACCOUNT_HEADER, account),
    )
    return made


def unchecked(endpoint, service, account, region="us-east-1"):
    """A client that sends what it is given, so that the server's validation is what answers."""
    return client(endpoint, service, account, region, parameter_validation=False)


def error_of(raised: pytest.ExceptionInfo) -> tuple[str, int]:
    response = raised.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def wait_for(read, done, timeout: float = 15.0, every: float = 0.05):
    """Calls READ until DONE(value); returns every distinct value seen, in order."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if not seen or seen[-1] != value:
            seen.append(value)
        if done(value):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {timeout}s; seen: {seen}")
        time.sleep(every)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def post(url: str) -> dict:
    request = urllib.request.Request(url, method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


# --- the shared library: botocore's client side against the stand-ins' server side -------------


def as_request(serialized: dict, host: str = "127.0.0.1") -> standin.Request:
    """botocore's serialized request as the stand-in's server would receive it."""
    import email.message
    import urllib.parse

    headers = email.message.Message()
    for key, value in serialized["headers"].items():
        headers[key] = value
    path = serialized["url_path"]
    query = serialized["query_string"]
    if query:
        path += "?" + (
            query if isinstance(query, str) else urllib.parse.urlencode(query, doseq=True)
        )
    body = serialized["body"]
    if isinstance(body, dict):
        body = urllib.parse.urlencode(body).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded; charset=utf-8"
    if isinstance(body, str):
        body = body.encode()
    return standin.Request(serialized["method"], path, headers, body or b"")


ROUND_TRIPS = [
    (
        "autoscaling",
        "StartInstanceRefresh",
        {
            "AutoScalingGroupName": "web",
            "DesiredConfiguration": {
                "LaunchTemplate": {"LaunchTemplateName": "web", "Version": "3"}
            },
            "Preferences": {
                "CheckpointPercentages": [10, 50, 100],
                "CheckpointDelay": 60,
                "AutoRollback": True,
                "AlarmSpecification": {"Alarms": ["errors", "latency"]},
            },
        },
    ),
    (
        "ec2",
        "RunInstances",
        {
            "ImageId": "ami-12345678",
            "MinCount": 1,
            "MaxCount": 2,
            "InstanceType": "t3.micro",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": [{"Key": "a", "Value": "b"}]}
            ],
            "BlockDeviceMappings": [
                {"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8, "Encrypted": True}}
            ],
            "MetadataOptions": {"HttpTokens": "required"},
        },
    ),
    (
        "ecs",
        "UpdateService",
        {
            "service": "api",
            "taskDefinition": "web:2",
            "deploymentConfiguration": {
                "deploymentCircuitBreaker": {"enable": True, "rollback": True},
                "alarms": {"alarmNames": ["errors"], "enable": True, "rollback": True},
            },
        },
    ),
    (
        "imagebuilder",
        "ListImageBuildVersions",
        {
            "imageVersionArn": "arn:aws:imagebuilder:us-east-1:123456789012:image/web/1.0.0",
            "maxResults": 5,
        },
    ),
    (
        "imagebuilder",
        "UntagResource",
        {
            "resourceArn": "arn:aws:imagebuilder:us-east-1:123456789012:image-recipe/web/1.0.0",
            "tagKeys": ["a", "b"],
        },
    ),
    (
        "ebs",
        "PutSnapshotBlock",
        {
            "SnapshotId": "snap-0123456789abcdef0",
            "BlockIndex": 7,
            "BlockData": b"\0" * 16,
            "DataLength": 16,
            "Checksum": "x" * 44,
            "ChecksumAlgorithm": "SHA256",
        },
    ),
]


@pytest.mark.parametrize(
    "service,operation,params", ROUND_TRIPS, ids=[f"{s}.{o}" for s, o, _ in ROUND_TRIPS]
)
def test_the_library_parses_what_botocore_serializes(service, operation, params):
    api = standin.Api(service)
    model = api.model.operation_model(operation)
    serialized = botocore.serialize.create_serializer(api.protocol).serialize_to_request(
        params, model
    )
    request = as_request(serialized)

    assert api.operation(request).name == operation
    parsed = api.parse(request, model)
    if isinstance(parsed.get("BlockData"), bytes):
        parsed["BlockData"] = bytes(parsed["BlockData"])
    assert parsed == params
    api.validate(model, parsed)  # a valid request passes


def test_the_library_rejects_what_the_model_forbids():
    api = standin.Api("autoscaling")
    model = api.model.operation_model("StartInstanceRefresh")
    bad = {
        "AutoScalingGroupName": "x" * 256,  # max 255
        "Strategy": "Sideways",  # enum
        "Preferences": {"MinHealthyPercentage": 101},  # max 100
    }
    with pytest.raises(standin.ApiError) as raised:
        api.validate(model, bad)
    assert raised.value.code == "ValidationError"
    assert raised.value.message.startswith("3 validation errors detected")
    assert "valid max length: 255" in raised.value.message
    assert "must be one of: Rolling, ReplaceRootVolume" in raised.value.message
    assert "valid max value: 100" in raised.value.message

    ec2 = standin.Api("ec2")
    with pytest.raises(standin.ApiError) as raised:
        ec2.validate(ec2.model.operation_model("CopyImage"), {"Name": "x"})
    assert raised.value.code == "MissingParameter"


def test_query_answers_parse_with_botocore():
    api = standin.Api("autoscaling")
    model = api.model.operation_model("DescribeInstanceRefreshes")
    result = {
        "InstanceRefreshes": [
            {
                "InstanceRefreshId": "r-1",
                "AutoScalingGroupName": "web",
                "Status": "InProgress",
                "PercentageComplete": 50,
                "Preferences": {"CheckpointPercentages": [50, 100], "AutoRollback": True},
            }
        ],
        "NextToken": "2",
    }
    response = api.respond(model, result)
    parser = botocore.parsers.create_parser("query")
    parsed = parser.parse(
        {"status_code": response.status, "headers": dict(response.headers), "body": response.body},
        model.output_shape,
    )
    parsed.pop("ResponseMetadata")
    assert parsed == result

    error = api.error(standin.ApiError("ActiveInstanceRefreshNotFound", "none"))
    parsed = parser.parse(
        {"status_code": error.status, "headers": dict(error.headers), "body": error.body},
        model.output_shape,
    )
    assert parsed["Error"]["Code"] == "ActiveInstanceRefreshNotFound"


# --- throttle_proxy.py --------------------------------------------------------------------------


def test_actions_fall_into_aws_throttling_categories():
    import throttle_proxy

    assert throttle_proxy.category("CopyImage", {}) == "resource-intensive"
    assert throttle_proxy.category("DescribeImages", {}) == "unfiltered"
    assert throttle_proxy.category("DescribeImages", {"ImageIds": ["ami-1"]}) == "non-mutating"
    assert throttle_proxy.category("DescribeImages", {"Filters": [{"Name": "x"}]}) == "non-mutating"
    assert throttle_proxy.category("CreateTags", {}) == "mutating"
    assert throttle_proxy.category("EnableImageDeprecation", {}) == "mutating"
    assert throttle_proxy.category("CancelExportTask", {}) == "uncategorized"


def test_throttle_answers_request_limit_exceeded_per_action_and_region(throttle, account):
    east = client(throttle, "ec2", account)
    for _ in range(2):
        assert east.describe_regions()["Regions"]
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        east.describe_regions()
    assert error_of(raised) == ("RequestLimitExceeded", 503)
    # Another region has its own bucket, another action too.
    assert client(throttle, "ec2", account, "eu-west-1").describe_regions()["Regions"]
    assert east.describe_availability_zones()["AvailabilityZones"]

    stats = get_json(f"{throttle}/_standin/stats?account={account}")["actions"]
    assert stats["DescribeRegions"]["passed"] == 3
    assert stats["DescribeRegions"]["throttled"] == 1


def test_throttle_limits_concurrent_copies_per_destination_region(throttle, account):
    east = client(throttle, "ec2", account)
    west = client(throttle, "ec2", account, "us-west-2")
    source = east.register_image(
        Name="source",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]
    copies = [
        west.copy_image(Name=f"copy-{i}", SourceImageId=source, SourceRegion="us-east-1")["ImageId"]
        for i in range(2)
    ]
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        west.copy_image(Name="copy-2", SourceImageId=source, SourceRegion="us-east-1")
    assert error_of(raised) == ("ResourceLimitExceeded", 400)
    # Another destination region is not affected.
    client(throttle, "ec2", account, "eu-west-1").copy_image(
        Name="copy-eu", SourceImageId=source, SourceRegion="us-east-1"
    )

    states = lambda: [
        i["State"] for i in west.describe_images(ImageIds=copies)["Images"]
    ]  # noqa: E731
    seen = wait_for(states, lambda s: s == ["available", "available"])
    assert seen[0] == ["pending", "pending"]
    west.copy_image(Name="copy-3", SourceImageId=source, SourceRegion="us-east-1")

    stats = get_json(f"{throttle}/_standin/stats?account={account}")
    assert stats["actions"]["CopyImage"]["limited"] == 1
    assert stats["peak_copies"]["us-west-2"] == 2


def test_throttle_shows_a_snapshot_copy_pending_while_in_flight(throttle, account):
    east = client(throttle, "ec2", account)
    volume = east.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    source = east.create_snapshot(VolumeId=volume)["SnapshotId"]
    south = client(throttle, "ec2", account, "ap-south-1")
    copied = south.copy_snapshot(SourceSnapshotId=source, SourceRegion="us-east-1")["SnapshotId"]

    def state():
        snapshot = south.describe_snapshots(SnapshotIds=[copied])["Snapshots"][0]
        return snapshot["State"], snapshot["Progress"]

    seen = wait_for(state, lambda s: s[0] == "completed")
    assert seen[0] == ("pending", "0%")
    assert seen[-1] == ("completed", "100%")


def test_throttle_holds_a_stalled_put_snapshot_block_until_the_client_gives_up(throttle, account):
    ebs = client(throttle, "ebs", account, read_timeout=1, connect_timeout=2)
    snapshot = ebs.start_snapshot(VolumeSize=1)
    assert snapshot["BlockSize"] == 524288  # --aws-block-size
    block = b"\1" * 524288
    import base64
    import hashlib

    upload = dict(
        SnapshotId=snapshot["SnapshotId"],
        BlockIndex=0,
        BlockData=block,
        DataLength=len(block),
        Checksum=base64.b64encode(hashlib.sha256(block).digest()).decode(),
        ChecksumAlgorithm="SHA256",
    )
    post(f"{throttle}/_standin/stall?action=PutSnapshotBlock&count=1")
    started = time.monotonic()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        ebs.put_snapshot_block(**upload)
    assert time.monotonic() - started >= 1
    assert ebs.put_snapshot_block(**upload)["Checksum"] == upload["Checksum"]  # the retry lands

    stats = get_json(f"{throttle}/_standin/stats?account={account}")["actions"]["PutSnapshotBlock"]
    assert stats == {"passed": 1, "throttled": 0, "limited": 0, "stalled": 1}


def test_throttle_limits_and_stalls_can_be_set_per_account(throttle, account):
    other = f"{int(account) + 5_000_000:012d}"
    url = f"{throttle}/_standin/limits?account={account}"
    request = urllib.request.Request(
        url, method="POST", data=json.dumps({"actions": {"DescribeKeyPairs": [1, 0.01]}}).encode()
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.load(answer)["limits"]["actions"] == {"DescribeKeyPairs": [1.0, 0.01]}
    mine, theirs = client(throttle, "ec2", account), client(throttle, "ec2", other)
    mine.describe_key_pairs()
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        mine.describe_key_pairs()
    assert error_of(raised) == ("RequestLimitExceeded", 503)
    for _ in range(3):
        theirs.describe_key_pairs()  # the defaults: 100 a second

    bad = urllib.request.Request(url, method="POST", data=b'{"max_copy": 3}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=10)
    assert refused.value.code == 400

    # A stall for one account holds only that account's requests.
    post(f"{throttle}/_standin/stall?action=DescribeVolumes&count=1&account={other}")
    assert client(throttle, "ec2", account).describe_volumes()["Volumes"] == []
    impatient = client(throttle, "ec2", other, read_timeout=1, connect_timeout=2)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        impatient.describe_volumes()
    assert impatient.describe_volumes()["Volumes"] == []


def test_throttle_stalls_requests_of_other_services_by_their_target(throttle, account):
    import hashlib

    ecr = client(throttle, "ecr", account)
    ecr.create_repository(repositoryName="stalled")
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2}
    config["digest"] = "sha256:" + "a" * 64
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [],
        }
    )
    digest = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    ecr.put_image(repositoryName="stalled", imageManifest=manifest, imageDigest=digest)
    images = {"repositoryName": "stalled", "imageIds": [{"imageDigest": digest}]}
    target = "AmazonEC2ContainerRegistry_V20150921.BatchDeleteImage"
    post(f"{throttle}/_standin/stall?action={target}&count=1&account={account}")
    impatient = client(throttle, "ecr", account, read_timeout=1, connect_timeout=2)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        impatient.batch_delete_image(**images)
    # Held, never forwarded: the image is still there; the next request goes through.
    details = ecr.describe_images(repositoryName="stalled")["imageDetails"]
    assert [d["imageDigest"] for d in details] == [digest]
    ecr.batch_delete_image(**images)
    assert ecr.describe_images(repositoryName="stalled")["imageDetails"] == []
    stats = get_json(f"{throttle}/_standin/stats?account={account}")["actions"][target]
    assert stats == {"passed": 1, "throttled": 0, "limited": 0, "stalled": 1}


def test_throttle_limits_put_snapshot_block_per_snapshot(throttle, account):
    ebs = client(throttle, "ebs", account)
    first, second = (ebs.start_snapshot(VolumeSize=1)["SnapshotId"] for _ in range(2))
    block = b"\0" * 512

    def put(snapshot, index):
        return ebs.put_snapshot_block(
            SnapshotId=snapshot,
            BlockIndex=index,
            BlockData=block,
            DataLength=len(block),
            Checksum="x" * 44,
            ChecksumAlgorithm="SHA256",
        )

    for index in range(3):  # the --limits file allows 3 at once per snapshot
        put(first, index)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        put(first, 3)
    assert error_of(raised) == ("RequestThrottledException", 400)
    assert raised.value.response["Reason"] == "RESOURCE_LEVEL_THROTTLE"
    put(second, 0)  # another snapshot has its own bucket


def put_block(ebs, snapshot: str, index: int, data: bytes):
    import base64
    import hashlib

    block = data.ljust(524288, b"\0")
    return ebs.put_snapshot_block(
        SnapshotId=snapshot,
        BlockIndex=index,
        BlockData=block,
        DataLength=len(block),
        Checksum=base64.b64encode(hashlib.sha256(block).digest()).decode(),
        ChecksumAlgorithm="SHA256",
    )


def read_blocks(ebs, snapshot: str, **listing) -> dict[int, bytes]:
    """The snapshot's listed blocks as EBS reads them back, first 8 bytes of each."""
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot, **listing)["Blocks"]
    return {
        b["BlockIndex"]: ebs.get_snapshot_block(
            SnapshotId=snapshot, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"]
        )["BlockData"].read()[:8]
        for b in listed
    }


def test_throttle_reads_a_child_snapshot_through_its_parents(throttle, account):
    ebs = client(throttle, "ebs", account)
    parent = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for index, data in ((0, b"A"), (1, b"B"), (2, b"C")):
        put_block(ebs, parent, index, data)
    ebs.complete_snapshot(SnapshotId=parent, ChangedBlocksCount=3)
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)["SnapshotId"]
    put_block(ebs, child, 1, b"D")
    put_block(ebs, child, 2, b"")  # zeros written over the parent's data
    put_block(ebs, child, 4, b"E")

    zeros = b"\0" * 8
    padded = lambda data: data.ljust(8, b"\0")  # noqa: E731
    expected = {0: padded(b"A"), 1: padded(b"D"), 2: zeros, 4: padded(b"E")}
    assert read_blocks(ebs, child) == expected  # while the child is pending
    ebs.complete_snapshot(SnapshotId=child, ChangedBlocksCount=3)
    assert read_blocks(ebs, child) == expected
    # The parent is untouched; a grandchild with no blocks of its own reads as its parent.
    assert read_blocks(ebs, parent) == {0: padded(b"A"), 1: padded(b"B"), 2: padded(b"C")}
    grandchild = ebs.start_snapshot(VolumeSize=2, ParentSnapshotId=child)["SnapshotId"]
    assert read_blocks(ebs, grandchild) == expected
    # Pages, as EBS gives them: from a block index, at most MaxResults at a time.
    assert read_blocks(ebs, child, StartingBlockIndex=2) == {2: zeros, 4: expected[4]}
    first = ebs.list_snapshot_blocks(SnapshotId=grandchild, MaxResults=100)
    assert "NextToken" not in first and len(first["Blocks"]) == 4
    # A block neither the child nor its parents hold.
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ebs.get_snapshot_block(SnapshotId=child, BlockIndex=3, BlockToken="x" * 10)
    assert error_of(raised) == ("ValidationException", 400)
    assert raised.value.response["Reason"] == "INVALID_BLOCK"


def test_throttle_refuses_parents_as_ebs_does(throttle, account):
    ebs = client(throttle, "ebs", account)

    def refused(**start) -> tuple[str, int, str]:
        with pytest.raises(botocore.exceptions.ClientError) as raised:
            ebs.start_snapshot(**start)
        return (*error_of(raised), raised.value.response.get("Reason"))

    missing = "snap-0123456789abcdef0"
    assert refused(VolumeSize=1, ParentSnapshotId=missing) == (
        "ResourceNotFoundException",
        404,
        "SNAPSHOT_NOT_FOUND",
    )
    parent = ebs.start_snapshot(VolumeSize=2)["SnapshotId"]
    assert refused(VolumeSize=2, ParentSnapshotId=parent) == (
        "ValidationException",
        400,
        "INVALID_DEPENDENCY_REQUEST",
    )
    ebs.complete_snapshot(SnapshotId=parent, ChangedBlocksCount=0)
    assert refused(VolumeSize=1, ParentSnapshotId=parent) == (
        "ValidationException",
        400,
        "INVALID_VOLUME_SIZE",
    )
    assert refused(VolumeSize=2, ParentSnapshotId=parent, Encrypted=True) == (
        "ValidationException",
        400,
        "INVALID_PARAMETER_VALUE",
    )
    assert ebs.start_snapshot(VolumeSize=2, ParentSnapshotId=parent)["SnapshotId"]
    assert ebs.start_snapshot(VolumeSize=3, ParentSnapshotId=parent)["SnapshotId"]


def test_throttle_shows_ebs_direct_encryption_and_the_default_key(throttle, account):
    ebs, ec2 = client(throttle, "ebs", account), client(throttle, "ec2", account)
    kms = client(throttle, "kms", account)
    default = ec2.get_ebs_default_kms_key_id()["KmsKeyId"]
    assert default == kms.describe_key(KeyId="alias/aws/ebs")["KeyMetadata"]["Arn"]
    own = kms.create_key()["KeyMetadata"]["Arn"]
    plain = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    by_default = ebs.start_snapshot(VolumeSize=1, Encrypted=True)["SnapshotId"]
    keyed = ebs.start_snapshot(VolumeSize=1, Encrypted=True, KmsKeyArn=own)["SnapshotId"]
    for snapshot in (by_default, keyed):
        ebs.complete_snapshot(SnapshotId=snapshot, ChangedBlocksCount=0)
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=keyed)["SnapshotId"]

    described = {
        s["SnapshotId"]: (s["Encrypted"], s.get("KmsKeyId"))
        for s in ec2.describe_snapshots(SnapshotIds=[plain, by_default, keyed, child])["Snapshots"]
    }
    assert described == {
        plain: (False, None),
        by_default: (True, default),
        keyed: (True, own),
        child: (True, own),  # a child has its parent's key
    }
    # The same default key the next time (made once).
    assert ec2.get_ebs_default_kms_key_id()["KmsKeyId"] == default


def test_throttle_refuses_invalid_requests_without_forwarding_them(throttle, account):
    ec2 = unchecked(throttle, "ec2", account)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="t9.huge")
    code, status = error_of(raised)
    assert (code, status) == ("InvalidParameterValue", 400)
    assert "t9.huge" in raised.value.response["Error"]["Message"]
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ec2.copy_image(Name="x")
    assert error_of(raised)[0] == "MissingParameter"

    actions = get_json(f"{throttle}/_standin/stats?account={account}")["actions"]
    assert "RunInstances" not in actions and "CopyImage" not in actions


def test_throttle_forwards_other_services(throttle, account):
    s3 = client(throttle, "s3", account)
    s3.create_bucket(Bucket=f"b-{account}")
    s3.put_object(Bucket=f"b-{account}", Key="k", Body=b"payload")
    assert s3.get_object(Bucket=f"b-{account}", Key="k")["Body"].read() == b"payload"
    assert client(throttle, "sts", account).get_caller_identity()["Account"] == account


# --- asg_ecs_standin.py: Auto Scaling ---------------------------------------------------------


def make_group(endpoint, account, name="web", version="1", capacity=4, image="ami-11111111"):
    ec2 = client(endpoint, "ec2", account)
    template = ec2.create_launch_template(
        LaunchTemplateName=f"{name}-lt",
        LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    ec2.create_launch_template_version(
        LaunchTemplateId=template,
        LaunchTemplateData={"ImageId": "ami-22222222", "InstanceType": "t3.micro"},
    )
    client(endpoint, "autoscaling", account).create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateId": template, "Version": version},
        MinSize=capacity,
        MaxSize=capacity,
        DesiredCapacity=capacity,
        AvailabilityZones=["us-east-1a"],
    )
    return template


def make_alarm(endpoint, account, name="errors"):
    client(endpoint, "cloudwatch", account).put_metric_alarm(
        AlarmName=name,
        MetricName="errors",
        Namespace="app",
        Statistic="Sum",
        Period=60,
        EvaluationPeriods=1,
        Threshold=1,
        ComparisonOperator="GreaterThanThreshold",
    )


def refresh_of(asg, group="web"):
    def read():
        refresh = asg.describe_instance_refreshes(AutoScalingGroupName=group)["InstanceRefreshes"][
            0
        ]
        return refresh["Status"], refresh["PercentageComplete"], refresh.get("StatusReason")

    return read


def test_a_canary_refresh_passes_its_checkpoints_and_updates_the_group(asg_ecs, moto, account):
    template = make_group(asg_ecs, account)
    asg = client(asg_ecs, "autoscaling", account)
    refresh_id = asg.start_instance_refresh(
        AutoScalingGroupName="web",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}},
        Preferences={
            "CheckpointPercentages": [25, 100],
            "CheckpointDelay": 1000,
            "MinHealthyPercentage": 75,
        },
    )["InstanceRefreshId"]

    seen = wait_for(refresh_of(asg), lambda s: s[0] not in standin_active())
    statuses = [s[0] for s in seen]
    assert statuses[0] == "Pending" and statuses[-1] == "Successful"
    assert ("InProgress", 25, "Checkpoint 25% reached, waiting for the checkpoint delay.") in seen
    assert seen[-1][1] == 100
    described = asg.describe_instance_refreshes(
        AutoScalingGroupName="web", InstanceRefreshIds=[refresh_id]
    )
    assert described["InstanceRefreshes"][0]["InstancesToUpdate"] == 0
    # moto itself (not the stand-in) holds the group's new launch template version.
    group = client(moto, "autoscaling", account).describe_auto_scaling_groups(
        AutoScalingGroupNames=["web"]
    )
    assert group["AutoScalingGroups"][0]["LaunchTemplate"]["Version"] == "2"


def standin_active():
    import asg_ecs_standin

    return asg_ecs_standin.ACTIVE_REFRESH


def test_an_alarm_at_the_first_checkpoint_rolls_the_refresh_back(asg_ecs, moto, account):
    template = make_group(asg_ecs, account)
    make_alarm(asg_ecs, account)
    asg = client(asg_ecs, "autoscaling", account)
    asg.start_instance_refresh(
        AutoScalingGroupName="web",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}},
        Preferences={
            "CheckpointPercentages": [50, 100],
            "CheckpointDelay": 5000,
            "AutoRollback": True,
            "AlarmSpecification": {"Alarms": ["errors"]},
        },
    )
    wait_for(refresh_of(asg), lambda s: s[2] and "Checkpoint 50%" in s[2])
    client(moto, "cloudwatch", account).set_alarm_state(
        AlarmName="errors", StateValue="ALARM", StateReason="test"
    )

    seen = wait_for(refresh_of(asg), lambda s: s[0] not in standin_active())
    assert seen[-1][0] == "RollbackSuccessful"
    refresh = asg.describe_instance_refreshes(AutoScalingGroupName="web")["InstanceRefreshes"][0]
    assert refresh["RollbackDetails"]["RollbackReason"] == "The alarm errors is in ALARM state."
    assert refresh["RollbackDetails"]["PercentageCompleteOnRollback"] == 100
    group = client(moto, "autoscaling", account).describe_auto_scaling_groups(
        AutoScalingGroupNames=["web"]
    )
    assert group["AutoScalingGroups"][0]["LaunchTemplate"]["Version"] == "1"


def test_an_alarm_without_auto_rollback_fails_the_refresh(asg_ecs, moto, account):
    template = make_group(asg_ecs, account)
    make_alarm(asg_ecs, account)
    client(moto, "cloudwatch", account).set_alarm_state(
        AlarmName="errors", StateValue="ALARM", StateReason="test"
    )
    asg = client(asg_ecs, "autoscaling", account)
    asg.start_instance_refresh(
        AutoScalingGroupName="web",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}},
        Preferences={"AlarmSpecification": {"Alarms": ["errors"]}},
    )
    seen = wait_for(refresh_of(asg), lambda s: s[0] not in standin_active())
    assert seen[-1][0] == "Failed"
    assert seen[-1][2] == "The alarm errors is in ALARM state."


def test_rollback_is_refused_where_aws_refuses_it(asg_ecs, account):
    template = make_group(asg_ecs, account, version="$Latest")
    asg = unchecked(asg_ecs, "autoscaling", account)
    desired = {"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}}
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        asg.start_instance_refresh(
            AutoScalingGroupName="web",
            DesiredConfiguration=desired,
            Preferences={"AutoRollback": True},
        )
    assert error_of(raised) == ("ValidationError", 400)
    assert "$Latest or $Default" in raised.value.response["Error"]["Message"]

    asg.start_instance_refresh(
        AutoScalingGroupName="web",
        DesiredConfiguration=desired,
        Preferences={"CheckpointPercentages": [50, 100], "CheckpointDelay": 5000},
    )
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        asg.rollback_instance_refresh(AutoScalingGroupName="web")
    assert error_of(raised)[0] == "IrreversibleInstanceRefresh"

    # A group whose image comes from an SSM parameter cannot roll back either.
    ssm_template = make_group(asg_ecs, account, name="ssm", image="resolve:ssm:/app/ami")
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        asg.start_instance_refresh(
            AutoScalingGroupName="ssm",
            DesiredConfiguration={
                "LaunchTemplate": {"LaunchTemplateId": ssm_template, "Version": "2"}
            },
            Preferences={"AutoRollback": True},
        )
    assert "Systems Manager parameter" in raised.value.response["Error"]["Message"]


def test_bake_time_holds_the_refresh_in_baking_and_skip_matching_skips(asg_ecs, moto, account):
    template = make_group(asg_ecs, account)
    asg = client(asg_ecs, "autoscaling", account)
    asg.start_instance_refresh(
        AutoScalingGroupName="web",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}},
        Preferences={"BakeTime": 1000, "MinHealthyPercentage": 50},  # a second, scaled
    )
    seen = wait_for(refresh_of(asg), lambda s: s[0] not in standin_active())
    statuses = [s[0] for s in seen]
    assert statuses.index("Baking") > statuses.index("InProgress")
    assert seen[-1][0] == "Successful"

    # The group now runs version 2: a refresh to it again replaces nothing.
    refresh_id = asg.start_instance_refresh(
        AutoScalingGroupName="web",
        DesiredConfiguration={"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}},
        Preferences={"SkipMatching": True},
    )["InstanceRefreshId"]
    seen = wait_for(refresh_of(asg), lambda s: s[0] not in standin_active())
    assert seen[-1][:2] == ("Successful", 100)
    refresh = asg.describe_instance_refreshes(
        AutoScalingGroupName="web", InstanceRefreshIds=[refresh_id]
    )["InstanceRefreshes"][0]
    assert refresh["InstancesToUpdate"] == 0


def test_cancel_and_the_one_refresh_at_a_time_rule(asg_ecs, account):
    template = make_group(asg_ecs, account)
    asg = client(asg_ecs, "autoscaling", account)
    desired = {"LaunchTemplate": {"LaunchTemplateId": template, "Version": "2"}}
    first = asg.start_instance_refresh(
        AutoScalingGroupName="web",
        DesiredConfiguration=desired,
        # A second per batch (scaled): the refresh is Cancelling until the batch has warmed up.
        Preferences={"InstanceWarmup": 1000},
    )["InstanceRefreshId"]
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        asg.start_instance_refresh(AutoScalingGroupName="web", DesiredConfiguration=desired)
    assert error_of(raised)[0] == "InstanceRefreshInProgress"

    assert asg.cancel_instance_refresh(AutoScalingGroupName="web")["InstanceRefreshId"] == first
    seen = wait_for(refresh_of(asg), lambda s: s[0] == "Cancelled")
    assert seen[0][0] == "Cancelling"
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        asg.cancel_instance_refresh(AutoScalingGroupName="web")
    assert error_of(raised)[0] == "ActiveInstanceRefreshNotFound"


def test_autoscaling_requests_are_validated_and_the_rest_forwarded(asg_ecs, account):
    make_group(asg_ecs, account)
    asg = unchecked(asg_ecs, "autoscaling", account)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        asg.start_instance_refresh(
            AutoScalingGroupName="web", Preferences={"MinHealthyPercentage": 101}
        )
    assert error_of(raised) == ("ValidationError", 400)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        asg.start_instance_refresh(AutoScalingGroupName="nope")
    assert "not found" in raised.value.response["Error"]["Message"]
    # moto-only calls pass through.
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"]
    assert len(groups[0]["Instances"]) == 4


# --- asg_ecs_standin.py: ECS --------------------------------------------------------------------


def make_service(endpoint, account, configuration):
    ecs = client(endpoint, "ecs", account)
    ec2 = client(endpoint, "ec2", account)
    ecs.create_cluster(clusterName="main")

    def register(image, environment=()):
        return ecs.register_task_definition(
            family="api",
            containerDefinitions=[
                {"name": "api", "image": image, "memory": 128, "environment": list(environment)}
            ],
            requiresCompatibilities=["FARGATE"],
            networkMode="awsvpc",
            cpu="256",
            memory="512",
        )["taskDefinition"]["taskDefinitionArn"]

    good = register("repo@sha256:" + "1" * 64)
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    group = ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"]
    ecs.create_service(
        cluster="main",
        serviceName="api",
        taskDefinition=good,
        desiredCount=2,
        launchType="FARGATE",
        networkConfiguration={
            "awsvpcConfiguration": {"subnets": [subnet], "securityGroups": [group]}
        },
        deploymentConfiguration=configuration,
    )
    return ecs, register, good


def deployments_of(ecs):
    def read():
        service = ecs.describe_services(cluster="main", services=["api"])["services"][0]
        return tuple(
            (d["status"], d["taskDefinition"].rsplit("/", 1)[1], d["rolloutState"])
            for d in service["deployments"]
        )

    return read


def settled(deployments) -> bool:
    return len(deployments) == 1 and deployments[0][2] != "IN_PROGRESS"


def rollout_events(ecs):
    return ecs.describe_services(cluster="main", services=["api"])["services"][0]["events"]


def test_an_ecs_deployment_replaces_the_old_one_and_completes(asg_ecs, account):
    ecs, register, _ = make_service(
        asg_ecs, account, {"deploymentCircuitBreaker": {"enable": True, "rollback": True}}
    )
    wait_for(deployments_of(ecs), settled)
    newer = register("repo@sha256:" + "2" * 64)
    updated = ecs.update_service(cluster="main", service="api", taskDefinition=newer)["service"]
    started = [(d["status"], d["rolloutState"], d["runningCount"]) for d in updated["deployments"]]
    assert started == [("PRIMARY", "IN_PROGRESS", 0), ("ACTIVE", "COMPLETED", 2)]

    seen = wait_for(deployments_of(ecs), settled)
    assert seen[-1] == (("PRIMARY", "api:2", "COMPLETED"),)
    service = ecs.describe_services(cluster="main", services=["api"])["services"][0]
    assert service["runningCount"] == 2 and service["pendingCount"] == 0
    assert service["deploymentConfiguration"]["deploymentCircuitBreaker"] == {
        "enable": True,
        "rollback": True,
    }
    assert service["events"][0]["message"].endswith("has reached a steady state.")


def test_failing_tasks_trip_the_circuit_breaker_and_roll_back(asg_ecs, moto, account):
    ecs, register, good = make_service(
        asg_ecs, account, {"deploymentCircuitBreaker": {"enable": True, "rollback": True}}
    )
    wait_for(deployments_of(ecs), settled)
    failing = register("repo:2", [{"name": "BAKE_STANDIN_TASKS_FAIL", "value": "true"}])
    ecs.update_service(cluster="main", service="api", taskDefinition=failing)

    seen = wait_for(deployments_of(ecs), settled)
    assert seen[-1] == (("PRIMARY", "api:1", "COMPLETED"),)
    events = [e["message"] for e in rollout_events(ecs)]
    assert any(
        "failed: ECS deployment circuit breaker: tasks failed to start." in e for e in events
    )
    assert any("rolling back to deployment" in e for e in events)
    # moto's service points at the previous revision again.
    moto_service = client(moto, "ecs", account).describe_services(cluster="main", services=["api"])[
        "services"
    ][0]
    assert moto_service["taskDefinition"] == good


def test_without_the_circuit_breaker_failing_tasks_keep_the_deployment_in_progress(
    asg_ecs, account
):
    ecs, register, _ = make_service(asg_ecs, account, {})
    wait_for(deployments_of(ecs), settled)
    ecs.update_service(cluster="main", service="api", taskDefinition=register("repo:standin-fail"))

    def primary():
        service = ecs.describe_services(cluster="main", services=["api"])["services"][0]
        first = service["deployments"][0]
        return first["rolloutState"], min(first["failedTasks"], 5), service["runningCount"]

    # Past the breaker's threshold of 3, the deployment still runs and the old tasks too.
    seen = wait_for(primary, lambda p: p[1] == 5)
    assert {p[0] for p in seen} == {"IN_PROGRESS"}
    assert {p[2] for p in seen} == {2}


def test_an_ecs_alarm_fails_the_deployment_and_rolls_back(asg_ecs, moto, account):
    make_alarm(asg_ecs, account, "api-errors")
    ecs, register, _ = make_service(
        asg_ecs,
        account,
        {"alarms": {"alarmNames": ["api-errors"], "enable": True, "rollback": True}},
    )
    wait_for(deployments_of(ecs), settled)
    client(moto, "cloudwatch", account).set_alarm_state(
        AlarmName="api-errors", StateValue="ALARM", StateReason="test"
    )
    ecs.update_service(
        cluster="main", service="api", taskDefinition=register("repo@sha256:" + "3" * 64)
    )
    seen = wait_for(deployments_of(ecs), settled)
    assert seen[-1] == (("PRIMARY", "api:1", "COMPLETED"),)
    events = [e["message"] for e in rollout_events(ecs)]
    assert any("failed: ECS deployment detected triggered alarms: api-errors." in e for e in events)


def test_a_service_made_in_moto_directly_is_stable_then_deploys(asg_ecs, moto, account):
    # Setup straight in moto, as a test of bake would do it.
    ecs, register, good = make_service(moto, account, {})
    ecs = client(asg_ecs, "ecs", account)
    assert deployments_of(ecs)() == (("PRIMARY", "api:1", "COMPLETED"),)
    updated = ecs.update_service(cluster="main", service="api", taskDefinition=register("repo:2"))
    started = [(d["status"], d["rolloutState"]) for d in updated["service"]["deployments"]]
    assert started == [("PRIMARY", "IN_PROGRESS"), ("ACTIVE", "COMPLETED")]
    seen = wait_for(deployments_of(ecs), settled)
    assert seen[-1] == (("PRIMARY", "api:2", "COMPLETED"),)


def test_ecs_requests_are_validated(asg_ecs, account):
    ecs = unchecked(asg_ecs, "ecs", account)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ecs.update_service(
            service="api", deploymentConfiguration={"deploymentCircuitBreaker": {"enable": "yes"}}
        )
    code, status = error_of(raised)
    assert (code, status) == ("InvalidParameterException", 400)
    assert "rollback" in raised.value.response["Error"]["Message"]
    assert ecs.list_clusters()["clusterArns"] == []  # forwarded to moto


# --- imagebuilder_standin.py --------------------------------------------------------------------


DOCUMENT = """\
name: hello
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: hello
        action: ExecuteBash
        inputs:
          commands: ["{command}"]
"""


def builder_setup(endpoint, account, command="echo hello", distributions=None):
    """A component, recipe, infrastructure and distribution configuration; returns their ARNs."""
    ib = client(endpoint, "imagebuilder", account)
    ec2 = client(endpoint, "ec2", account)
    client(endpoint, "iam", account).create_instance_profile(InstanceProfileName="builder")
    base = ec2.register_image(
        Name="base",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8}}],
    )["ImageId"]
    component = ib.create_component(
        name="hello",
        semanticVersion="1.0.0",
        platform="Linux",
        data=DOCUMENT.format(command=command),
    )["componentBuildVersionArn"]
    recipe = ib.create_image_recipe(
        name="web",
        semanticVersion="1.0.0",
        parentImage=base,
        components=[{"componentArn": component}],
    )["imageRecipeArn"]
    infrastructure = ib.create_infrastructure_configuration(
        name="infra", instanceProfileName="builder", instanceTypes=["t3.micro"]
    )["infrastructureConfigurationArn"]
    distribution = None
    if distributions is not None:
        distribution = ib.create_distribution_configuration(
            name="dist", distributions=distributions
        )["distributionConfigurationArn"]
    return ib, component, recipe, infrastructure, distribution


ALL_STATES = [
    "PENDING",
    "CREATING",
    "BUILDING",
    "TESTING",
    "DISTRIBUTING",
    "INTEGRATING",
    "AVAILABLE",
]


def assert_in_order(seen: list[str], order: list[str]) -> None:
    """SEEN is a subsequence of ORDER: polling may miss a state, never reorder one."""
    positions = [order.index(state) for state in seen]
    assert positions == sorted(set(positions)), seen


def image_state(ib, arn):
    return lambda: ib.get_image(imageBuildVersionArn=arn)["image"]["state"]["status"]


def test_a_build_goes_through_its_states_and_lands_amis_in_moto(imagebuilder, moto, account):
    target_account = f"{int(account) + 7_000_000:012d}"
    ec2 = client(imagebuilder, "ec2", account)
    template = ec2.create_launch_template(
        LaunchTemplateName="web", LaunchTemplateData={"ImageId": "ami-11111111"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    distributions = [
        {
            "region": "us-east-1",
            "amiDistributionConfiguration": {
                "name": "web-{{ imagebuilder:buildDate }}",
                "amiTags": {"bake:version": "v1"},
                "launchPermission": {"userIds": ["111122223333"]},
                "targetAccountIds": [target_account],
            },
            "launchTemplateConfigurations": [
                {"launchTemplateId": template, "setDefaultVersion": True}
            ],
            "ssmParameterConfigurations": [
                {"parameterName": "/bake/web", "dataType": "aws:ec2:image"}
            ],
        },
        {
            "region": "eu-west-1",
            "amiDistributionConfiguration": {"amiTags": {"bake:version": "v1"}},
        },
    ]
    ib, _, recipe, infrastructure, distribution = builder_setup(
        imagebuilder, account, distributions=distributions
    )
    arn = ib.create_image(
        imageRecipeArn=recipe,
        infrastructureConfigurationArn=infrastructure,
        distributionConfigurationArn=distribution,
    )["imageBuildVersionArn"]
    assert arn == f"arn:aws:imagebuilder:us-east-1:{account}:image/web/1.0.0/1"

    seen = wait_for(image_state(ib, arn), lambda s: s in ("AVAILABLE", "FAILED"), every=0.02)
    assert_in_order(seen, ALL_STATES)
    assert seen[0] == "PENDING" and seen[-1] == "AVAILABLE"

    amis = ib.get_image(imageBuildVersionArn=arn)["image"]["outputResources"]["amis"]
    placed = [(a["region"], a["accountId"]) for a in amis]
    assert placed == [("us-east-1", account), ("us-east-1", target_account), ("eu-west-1", account)]
    # The target account got its own AMI (moto cannot copy across accounts).
    target = client(moto, "ec2", target_account).describe_images(ImageIds=[amis[1]["image"]])
    assert target["Images"][0]["Name"] == amis[1]["name"]
    # Straight from moto: the AMIs exist, tagged and shared as the distribution says.
    east = client(moto, "ec2", account)
    image = east.describe_images(ImageIds=[amis[0]["image"]])["Images"][0]
    assert image["Name"].startswith("web-")
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert tags == {
        "bake:version": "v1",
        "CreatedBy": "EC2 Image Builder",
        "Ec2ImageBuilderArn": arn,
    }
    permissions = east.describe_image_attribute(
        ImageId=amis[0]["image"], Attribute="launchPermission"
    )
    assert permissions["LaunchPermissions"] == [{"UserId": "111122223333"}]
    assert client(moto, "ec2", account, "eu-west-1").describe_images(ImageIds=[amis[2]["image"]])[
        "Images"
    ]
    assert (
        client(moto, "ssm", account).get_parameter(Name="/bake/web")["Parameter"]["Value"]
        == amis[0]["image"]
    )
    described = east.describe_launch_templates(LaunchTemplateIds=[template])["LaunchTemplates"][0]
    assert described["DefaultVersionNumber"] == 2

    executions = ib.list_workflow_executions(imageBuildVersionArn=arn)["workflowExecutions"]
    assert [(w["type"], w["status"]) for w in executions] == [
        ("BUILD", "COMPLETED"),
        ("TEST", "COMPLETED"),
    ]
    # The build ran before the test: the states were gone through, whatever polling saw.
    assert executions[0]["endTime"] <= executions[1]["startTime"]
    steps = ib.list_workflow_step_executions(
        workflowExecutionId=executions[0]["workflowExecutionId"]
    )["steps"]
    assert steps[0]["name"] == "LaunchBuildInstance" and {s["status"] for s in steps} == {
        "COMPLETED"
    }
    summaries = ib.list_image_build_versions(imageVersionArn=arn.rsplit("/", 1)[0])[
        "imageSummaryList"
    ]
    assert [s["arn"] for s in summaries] == [arn]


def test_client_tokens_and_conflicts_behave_as_documented(imagebuilder, account):
    ib, component, recipe, infrastructure, _ = builder_setup(imagebuilder, account)
    document = DOCUMENT.format(command="echo again")
    first = ib.create_component(
        name="again",
        semanticVersion="1.0.0",
        platform="Linux",
        data=document,
        clientToken="token-1",
    )
    repeat = ib.create_component(
        name="again",
        semanticVersion="1.0.0",
        platform="Linux",
        data=document,
        clientToken="token-1",
    )
    assert repeat["componentBuildVersionArn"] == first["componentBuildVersionArn"]
    assert repeat["requestId"] == first["requestId"]
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.create_component(
            name="again",
            semanticVersion="2.0.0",
            platform="Linux",
            data=document,
            clientToken="token-1",
        )
    assert error_of(raised)[0] == "IdempotentParameterMismatchException"
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.create_component(name="again", semanticVersion="1.0.0", platform="Linux", data=document)
    assert error_of(raised)[0] == "ResourceInUseException"
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.create_image_recipe(
            name="web",
            semanticVersion="1.0.0",
            parentImage="ami-11111111",
            components=[{"componentArn": component}],
        )
    assert error_of(raised)[0] == "ResourceAlreadyExistsException"
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.delete_component(componentBuildVersionArn=component)
    assert error_of(raised)[0] == "ResourceDependencyException"
    # A second build of the same recipe version gets the next build number.
    builds = [
        ib.create_image(imageRecipeArn=recipe, infrastructureConfigurationArn=infrastructure)[
            "imageBuildVersionArn"
        ]
        for _ in range(2)
    ]
    assert [b.rsplit("/", 1)[1] for b in builds] == ["1", "2"]
    # Wildcard versions resolve to the newest.
    newest = ib.get_component(componentBuildVersionArn=component.rsplit("/", 2)[0] + "/x.x.x")[
        "component"
    ]
    assert newest["arn"] == component


def test_imagebuilder_requests_are_validated_against_the_model(imagebuilder, account):
    ib = unchecked(imagebuilder, "imagebuilder", account)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.create_component(
            name="bad!", semanticVersion="1.0", platform="Plan9", data="phases: []", clientToken="t"
        )
    code, status = error_of(raised)
    assert (code, status) == ("ValidationException", 400)
    message = raised.value.response["Error"]["Message"]
    assert message.startswith("3 validation errors detected")
    assert "Plan9" in message and "must be one of: Windows, Linux, macOS" in message
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.create_infrastructure_configuration(name="infra", clientToken="t")
    assert (
        'Missing required parameter in input: "instanceProfileName"'
        in raised.value.response["Error"]["Message"]
    )
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.get_image(
            imageBuildVersionArn="arn:aws:imagebuilder:us-east-1:123456789012:image/web/1.0.0/1"
        )
    assert error_of(raised) == ("ResourceNotFoundException", 404)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.create_component(
            name="broken",
            semanticVersion="1.0.0",
            platform="Linux",
            data="phases: [",
            clientToken="t2",
        )
    assert error_of(raised)[0] == "InvalidParameterValueException"
    client(imagebuilder, "iam", account).create_instance_profile(InstanceProfileName="builder")
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.create_infrastructure_configuration(
            name="infra",
            instanceProfileName="builder",
            subnetId="subnet-0000000f",
            clientToken="t3",
        )
    assert error_of(raised)[0] == "InvalidParameterValueException"
    assert "subnet subnet-0000000f does not exist" in raised.value.response["Error"]["Message"]


def test_a_marked_component_fails_the_build_with_a_reason(imagebuilder, account):
    ib, _, _, infrastructure, _ = builder_setup(
        imagebuilder, account, command="echo BAKE_STANDIN_FAIL_BUILD"
    )
    recipe = ib.list_image_recipes()["imageRecipeSummaryList"][0]["arn"]
    arn = ib.create_image(imageRecipeArn=recipe, infrastructureConfigurationArn=infrastructure)[
        "imageBuildVersionArn"
    ]
    seen = wait_for(image_state(ib, arn), lambda s: s in ("AVAILABLE", "FAILED"), every=0.02)
    assert_in_order(seen, ALL_STATES[:3] + ["FAILED"])
    assert seen[-1] == "FAILED"
    state = ib.get_image(imageBuildVersionArn=arn)["image"]["state"]
    assert "component/hello/1.0.0/1" in state["reason"] and "build phase" in state["reason"]
    executions = ib.list_workflow_executions(imageBuildVersionArn=arn)["workflowExecutions"]
    assert [(w["type"], w["status"]) for w in executions] == [
        ("BUILD", "FAILED"),
        ("TEST", "SKIPPED"),
    ]
    steps = ib.list_workflow_step_executions(
        workflowExecutionId=executions[0]["workflowExecutionId"]
    )["steps"]
    assert {s["name"]: s["status"] for s in steps}["ApplyBuildComponents"] == "FAILED"


def test_cancel_image_creation(imagebuilder, account):
    ib, _, recipe, infrastructure, _ = builder_setup(imagebuilder, account)
    arn = ib.create_image(imageRecipeArn=recipe, infrastructureConfigurationArn=infrastructure)[
        "imageBuildVersionArn"
    ]
    assert ib.cancel_image_creation(imageBuildVersionArn=arn)["imageBuildVersionArn"] == arn
    time.sleep(0.3)  # three steps' worth: a cancelled build stays cancelled
    state = ib.get_image(imageBuildVersionArn=arn)["image"]["state"]
    assert state["status"] == "CANCELLED"
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.cancel_image_creation(imageBuildVersionArn=arn)
    assert error_of(raised)[0] == "InvalidRequestException"
    assert ib.get_image(imageBuildVersionArn=arn)["image"]["outputResources"]["amis"] == []


def test_a_pipeline_execution_builds_an_image(imagebuilder, account):
    ib, _, recipe, infrastructure, _ = builder_setup(imagebuilder, account)
    pipeline = ib.create_image_pipeline(
        name="nightly",
        imageRecipeArn=recipe,
        infrastructureConfigurationArn=infrastructure,
        imageTestsConfiguration={"imageTestsEnabled": False},
    )["imagePipelineArn"]
    arn = ib.start_image_pipeline_execution(imagePipelineArn=pipeline)["imageBuildVersionArn"]
    seen = wait_for(image_state(ib, arn), lambda s: s in ("AVAILABLE", "FAILED"), every=0.02)
    assert "TESTING" not in seen and seen[-1] == "AVAILABLE"
    images = ib.list_image_pipeline_images(imagePipelineArn=pipeline)["imageSummaryList"]
    assert [i["arn"] for i in images] == [arn]
    assert ib.get_image(imageBuildVersionArn=arn)["image"]["sourcePipelineArn"] == pipeline
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ib.delete_image_recipe(imageRecipeArn=recipe)
    assert error_of(raised)[0] == "ResourceDependencyException"


DOCKERFILE = """\
FROM {{{ imagebuilder:parentImage }}}
{{{ imagebuilder:environments }}}
{{{ imagebuilder:components }}}
"""


def test_a_container_build_pushes_a_manifest_to_the_registry(imagebuilder, registry, account):
    ib, component, _, infrastructure, _ = builder_setup(imagebuilder, account)
    repository = f"standins/web-{account}"
    recipe = ib.create_container_recipe(
        containerType="DOCKER",
        name="web-container",
        semanticVersion="1.0.0",
        parentImage="debian:bookworm",
        components=[{"componentArn": component}],
        dockerfileTemplateData=DOCKERFILE,
        targetRepository={"service": "ECR", "repositoryName": repository},
    )["containerRecipeArn"]
    arn = ib.create_image(containerRecipeArn=recipe, infrastructureConfigurationArn=infrastructure)[
        "imageBuildVersionArn"
    ]
    wait_for(image_state(ib, arn), lambda s: s in ("AVAILABLE", "FAILED"))
    image = ib.get_image(imageBuildVersionArn=arn)["image"]
    assert image["state"]["status"] == "AVAILABLE", image["state"]
    uri = image["outputResources"]["containers"][0]["imageUris"][0]
    # The ECR host, as AWS names it; the bytes are in the registry standing in for it.
    assert uri == f"{account}.dkr.ecr.us-east-1.amazonaws.com/{repository}:1.0.0-1"
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/1.0.0-1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.load(answer)["schemaVersion"] == 2


def test_a_container_build_pushes_its_distributions_container_tags(imagebuilder, registry, account):
    repository = f"standins/tagged-{account}"
    target = {"service": "ECR", "repositoryName": repository}
    ib, component, _, infrastructure, distribution = builder_setup(
        imagebuilder,
        account,
        distributions=[
            {
                "region": "us-east-1",
                "containerDistributionConfiguration": {
                    "containerTags": ["stable", "v1"],
                    "targetRepository": target,
                },
            }
        ],
    )
    recipe = ib.create_container_recipe(
        containerType="DOCKER",
        name="tagged-container",
        semanticVersion="1.0.0",
        parentImage="debian:bookworm",
        components=[{"componentArn": component}],
        dockerfileTemplateData=DOCKERFILE,
        targetRepository=target,
    )["containerRecipeArn"]
    arn = ib.create_image(
        containerRecipeArn=recipe,
        infrastructureConfigurationArn=infrastructure,
        distributionConfigurationArn=distribution,
    )["imageBuildVersionArn"]
    wait_for(image_state(ib, arn), lambda s: s in ("AVAILABLE", "FAILED"))
    image = ib.get_image(imageBuildVersionArn=arn)["image"]
    assert image["state"]["status"] == "AVAILABLE", image["state"]
    host = f"{account}.dkr.ecr.us-east-1.amazonaws.com"
    assert image["outputResources"]["containers"][0]["imageUris"] == [
        f"{host}/{repository}:{tag}" for tag in ("1.0.0-1", "stable", "v1")
    ]
    digests = set()
    for tag in ("1.0.0-1", "stable", "v1"):
        request = urllib.request.Request(
            f"http://{registry}/v2/{repository}/manifests/{tag}",
            method="HEAD",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            digests.add(answer.headers["Docker-Content-Digest"])
    assert len(digests) == 1, digests


DOWNLOADING = """\
name: fetch
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Fetch
        action: S3Download
        inputs:
          - source: s3://{bucket}/files/blob
            destination: /tmp/blob
"""


def test_a_build_fails_when_a_components_s3_download_is_missing(imagebuilder, account):
    ib, _, _, infrastructure, _ = builder_setup(imagebuilder, account)
    ec2 = client(imagebuilder, "ec2", account)
    base = ec2.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    bucket = f"standin-files-{account}"
    fetch = ib.create_component(
        name="fetch",
        semanticVersion="1.0.0",
        platform="Linux",
        data=DOWNLOADING.format(bucket=bucket),
    )["componentBuildVersionArn"]
    recipe = ib.create_image_recipe(
        name="fetching", semanticVersion="1.0.0", parentImage=base,
        components=[{"componentArn": fetch}],
    )["imageRecipeArn"]

    def build() -> dict:
        arn = ib.create_image(
            imageRecipeArn=recipe, infrastructureConfigurationArn=infrastructure
        )["imageBuildVersionArn"]
        wait_for(image_state(ib, arn), lambda s: s in ("AVAILABLE", "FAILED"))
        return ib.get_image(imageBuildVersionArn=arn)["image"]["state"]

    state = build()
    assert state["status"] == "FAILED"
    assert f"cannot download s3://{bucket}/files/blob" in state["reason"], state
    s3 = client(imagebuilder, "s3", account)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="files/blob", Body=b"blob")
    assert build()["status"] == "AVAILABLE"


def test_imagebuilder_forwards_everything_else_to_moto(imagebuilder, account):
    ssm = client(imagebuilder, "ssm", account)
    ssm.put_parameter(Name="/x", Value="y", Type="String")
    assert ssm.get_parameter(Name="/x")["Parameter"]["Value"] == "y"
