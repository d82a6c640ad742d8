#!/usr/bin/env python3
"""A stand-in for Auto Scaling instance refreshes and ECS deployment state, in front of moto.

moto answers StartInstanceRefresh and its family with HTTP 500, and keeps one ECS deployment that
never progresses. This server serves those operations with AWS's documented states and forwards
everything else, byte for byte, to moto (`--upstream`). State is per account (`x-moto-account-id`)
and region (the SigV4 credential scope). Every Auto Scaling and ECS request, served or forwarded,
is first validated against botocore's model (see standin.py): a bad one gets AWS's
`ValidationError` (Auto Scaling, query protocol) or `InvalidParameterException` (ECS).

Auto Scaling (`StartInstanceRefresh`, `DescribeInstanceRefreshes`, `CancelInstanceRefresh`,
`RollbackInstanceRefresh`):

- Statuses `Pending` → `InProgress` → (`Baking`) → `Successful`; `Cancelling` → `Cancelled`;
  `Failed`; `RollbackInProgress` → `RollbackSuccessful` | `RollbackFailed`. One batch of
  instances is replaced every `--tick` seconds (or the preferences' `InstanceWarmup`, scaled);
  the batch is what `MinHealthyPercentage`/`MaxHealthyPercentage` allow (at least one instance).
  `PercentageComplete`, `InstancesToUpdate` and `ProgressDetails` follow.
- Checkpoints: the refresh pauses for `CheckpointDelay` (default 3600 s) at each of
  `CheckpointPercentages`, and ends at the last one (AWS: "the last number must be 100" to replace
  every instance). `BakeTime` keeps it in `Baking` after the last batch.
- `AlarmSpecification`: the alarms are read from moto's CloudWatch (`DescribeAlarms`) every tick
  while the refresh runs or bakes; one in `ALARM` fails the refresh, or rolls it back with
  `AutoRollback`. A test fires an alarm with moto's `SetAlarmState`. Unknown alarms are refused at
  start.
- Rollback (`RollbackInstanceRefresh`, or `AutoRollback`) is refused as AWS documents when there
  is no desired configuration, when the group's launch template version is `$Latest` or
  `$Default`, or when the group's or the desired launch template's image is an SSM parameter
  (`resolve:ssm:`): `IrreversibleInstanceRefresh` for RollbackInstanceRefresh, `ValidationError`
  for StartInstanceRefresh with `AutoRollback`. A rollback whose previous launch template version
  was deleted meanwhile ends `RollbackFailed`.
- On `Successful`, the group's launch template becomes the desired one in moto
  (`UpdateAutoScalingGroup`), as AWS does at the end of a refresh with a desired configuration.
- `SkipMatching`: a refresh whose desired launch template and version equal the group's replaces
  nothing and succeeds at once.

ECS (`CreateService`, `UpdateService`, `DescribeServices`, JSON protocol): moto keeps the service;
this stand-in keeps its deployments. A service made in moto directly (a test's setup) is taken, on
first sight, as stable: one `COMPLETED` deployment running its desired count.

- A new task definition (or `forceNewDeployment`) starts a `PRIMARY` deployment in `IN_PROGRESS`;
  the previous one becomes `ACTIVE` and drains as the new one's tasks start, one task every
  `--tick` seconds. When the new deployment runs `desiredCount` tasks it is `COMPLETED` and the
  old ones are gone. `DescribeServices` shows `deployments[]` with `rolloutState`,
  `rolloutStateReason`, `runningCount`, `pendingCount`, `failedTasks`, and the service's
  `runningCount`, `pendingCount`, `taskDefinition`, `deploymentConfiguration` and `events`.
- Failing tasks: a task definition one of whose containers has the environment variable
  `BAKE_STANDIN_TASKS_FAIL=true`, or whose image reference contains `standin-fail`, has every task
  stop before it runs (`failedTasks` grows by one a tick).
- `deploymentConfiguration.deploymentCircuitBreaker {enable, rollback}`: the deployment is
  `FAILED` once `failedTasks` reaches AWS's threshold (half the desired count, at least 3, at most
  200); with `rollback`, a new `PRIMARY` deployment of the last completed task definition starts
  and moto's service is pointed back at it.
- `deploymentConfiguration.alarms {alarmNames, enable, rollback}`: while the deployment is in
  progress, an alarm in `ALARM` in moto's CloudWatch fails it (and rolls back with `rollback`).

Not modelled: instances are not really replaced in moto (only counted), warm pools, mixed
instances policies beyond their launch template, `ReplaceRootVolume`, standby and scale-in
protected instances, instance refresh history older than six weeks, `MaxRecords` paging tokens
other than an index; ECS task sets, CODE_DEPLOY and EXTERNAL controllers, blue/green and
linear/canary ECS strategies, `bakeTimeInMinutes`, the circuit breaker's `thresholdConfiguration`
and `resetOnHealthyTask`, tasks and their ids (only counts), load balancer health checks,
`ListServiceDeployments`.

Usage: asg_ecs_standin.py --upstream http://127.0.0.1:MOTO_PORT [--port 0] [--tick 0.5]
       [--time-scale 1.0]
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions

import standin
from standin import ApiError, Request, Response, now

ACTIVE_REFRESH = {"Pending", "InProgress", "Baking", "Cancelling", "RollbackInProgress"}
# AWS's defaults for RefreshPreferences.
DEFAULT_MIN_HEALTHY = 90
DEFAULT_CHECKPOINT_DELAY = 3600
# The deployment circuit breaker's failed-task threshold: half the desired count, within these.
CIRCUIT_BREAKER_MIN = 3
CIRCUIT_BREAKER_MAX = 200
FAIL_ENVIRONMENT = "BAKE_STANDIN_TASKS_FAIL"
FAIL_IMAGE_MARKER = "standin-fail"


def _last(name_or_arn: str) -> str:
    return name_or_arn.rsplit("/", 1)[-1]


# --- Auto Scaling ---------------------------------------------------------------------------------


@dataclass
class Refresh:
    account: str
    region: str
    group: str
    id: str
    strategy: str
    preferences: dict
    desired: dict | None
    previous_template: dict | None
    total: int
    started: Any
    status: str = "Pending"
    reason: str | None = None
    replaced: int = 0
    ended: Any = None
    next_at: float = 0.0
    checkpoints: list[int] = field(default_factory=list)
    rollback: dict | None = None
    rolled_back: int = 0
    wait_until: float = 0.0
    checkpoints_reached: list[int] = field(default_factory=list)


class AutoScaling:
    OPERATIONS = {
        "StartInstanceRefresh",
        "DescribeInstanceRefreshes",
        "CancelInstanceRefresh",
        "RollbackInstanceRefresh",
    }

    def __init__(self, moto: standin.Moto, tick: float, scale: float):
        self.moto = moto
        self.tick = tick
        self.scale = scale
        self.refreshes: list[Refresh] = []
        self.lock = threading.RLock()

    def _asg(self, request_or_refresh):
        return self.moto.client(
            "autoscaling", request_or_refresh.region, request_or_refresh.account
        )

    def _group(self, client, name: str) -> dict:
        groups = client.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
        if not groups["AutoScalingGroups"]:
            raise ApiError(
                "ValidationError",
                f"AutoScalingGroup name not found - AutoScalingGroup '{name}' not found",
            )
        return groups["AutoScalingGroups"][0]

    @staticmethod
    def _group_template(group: dict) -> dict | None:
        template = group.get("LaunchTemplate")
        if template is None:
            policy = group.get("MixedInstancesPolicy") or {}
            template = (policy.get("LaunchTemplate") or {}).get("LaunchTemplateSpecification")
        return template

    def _image_of(self, account, region, template: dict) -> str | None:
        ec2 = self.moto.client("ec2", region, account)
        selector = {}
        if template.get("LaunchTemplateId"):
            selector["LaunchTemplateId"] = template["LaunchTemplateId"]
        else:
            selector["LaunchTemplateName"] = template.get("LaunchTemplateName")
        versions = ec2.describe_launch_template_versions(
            Versions=[template.get("Version") or "$Default"], **selector
        )["LaunchTemplateVersions"]
        return versions[0]["LaunchTemplateData"].get("ImageId") if versions else None

    def irreversible(self, account, region, group_template, desired) -> str | None:
        """Why AWS cannot roll this refresh back, or None."""
        if not desired or not desired.get("LaunchTemplate"):
            return "there is no desired configuration specified for the instance refresh"
        if group_template is None:
            return "the Auto Scaling group has no launch template"
        if (group_template.get("Version") or "$Default") in ("$Latest", "$Default"):
            return "the Auto Scaling group uses the launch template's $Latest or $Default version"
        for label, template in (
            ("the Auto Scaling group", group_template),
            ("the desired configuration", desired["LaunchTemplate"]),
        ):
            image = self._image_of(account, region, template) or ""
            if image.startswith("resolve:ssm:"):
                return (
                    f"{label} has a launch template that uses a Systems Manager parameter "
                    "instead of an AMI ID for the ImageId property"
                )
        return None

    def handle(self, request: Request, name: str, params: dict) -> dict:
        return getattr(self, f"_{name}")(request, params)

    def _StartInstanceRefresh(self, request, params) -> dict:
        name = params["AutoScalingGroupName"]
        client = self._asg(request)
        group = self._group(client, name)
        self._none_active(request, name)
        preferences = dict(params.get("Preferences") or {})
        preferences.setdefault("MinHealthyPercentage", DEFAULT_MIN_HEALTHY)
        preferences.setdefault("SkipMatching", False)
        preferences.setdefault("AutoRollback", False)
        preferences.setdefault("ScaleInProtectedInstances", "Ignore")
        preferences.setdefault("StandbyInstances", "Ignore")
        checkpoints = preferences.get("CheckpointPercentages") or []
        if checkpoints:
            preferences.setdefault("CheckpointDelay", DEFAULT_CHECKPOINT_DELAY)
            if checkpoints != sorted(checkpoints) or any(not 1 <= p <= 100 for p in checkpoints):
                raise ApiError(
                    "ValidationError",
                    "CheckpointPercentages must be in ascending order, each between 1 and 100.",
                )
        desired = params.get("DesiredConfiguration")
        group_template = self._group_template(group)
        if preferences["AutoRollback"]:
            why = self.irreversible(request.account, request.region, group_template, desired)
            if why:
                raise ApiError("ValidationError", f"AutoRollback is not supported because {why}.")
        alarms = (preferences.get("AlarmSpecification") or {}).get("Alarms") or []
        if alarms:
            cloudwatch = self.moto.client("cloudwatch", request.region, request.account)
            known = {
                a["AlarmName"]
                for a in cloudwatch.describe_alarms(AlarmNames=alarms)["MetricAlarms"]
            }
            missing = [a for a in alarms if a not in known]
            if missing:
                raise ApiError("ValidationError", f"Alarm(s) {', '.join(missing)} not found.")
        total = len(group.get("Instances") or [])
        if preferences["SkipMatching"] and desired and group_template:
            wanted = desired.get("LaunchTemplate") or {}
            same = all(
                (wanted.get(k) or None) in (None, group_template.get(k))
                for k in ("LaunchTemplateId", "LaunchTemplateName")
            ) and (wanted.get("Version") or "$Default") == (
                group_template.get("Version") or "$Default"
            )
            if same:
                total = 0
        refresh = Refresh(
            account=request.account,
            region=request.region,
            group=name,
            id=str(uuid.uuid4()),
            strategy=params.get("Strategy") or "Rolling",
            preferences=preferences,
            desired=desired,
            previous_template=group_template,
            total=total,
            started=now(),
            checkpoints=list(checkpoints),
            wait_until=time.monotonic() + self.tick,
        )
        with self.lock:
            self._none_active(request, name)  # again: another start may have won meanwhile
            self.refreshes.append(refresh)
        return {"InstanceRefreshId": refresh.id}

    def _none_active(self, request, name: str) -> None:
        with self.lock:
            for refresh in self.refreshes:
                key = (refresh.account, refresh.region, refresh.group)
                if (
                    key == (request.account, request.region, name)
                    and refresh.status in ACTIVE_REFRESH
                ):
                    raise ApiError(
                        "InstanceRefreshInProgress",
                        "An Instance Refresh is already in progress and blocks the execution of "
                        "this Instance Refresh.",
                    )

    def _DescribeInstanceRefreshes(self, request, params) -> dict:
        name = params["AutoScalingGroupName"]
        ids = params.get("InstanceRefreshIds")
        with self.lock:
            found = [
                r
                for r in reversed(self.refreshes)
                if (r.account, r.region, r.group) == (request.account, request.region, name)
                and (not ids or r.id in ids)
            ]
            token = params.get("NextToken") or "0"
            if not token.isdigit():
                raise ApiError("InvalidNextToken", f"The token {token} is invalid.")
            start = int(token)
            size = params.get("MaxRecords") or 50
            page = found[start : start + size]
            result: dict[str, Any] = {"InstanceRefreshes": [self._describe(r) for r in page]}
        if start + size < len(found):
            result["NextToken"] = str(start + size)
        return result

    def _percentage(self, refresh: Refresh) -> int:
        return 100 if refresh.total == 0 else refresh.replaced * 100 // refresh.total

    def _describe(self, refresh: Refresh) -> dict:
        percentage = self._percentage(refresh)
        if refresh.status == "Successful":
            percentage = (
                100 if not refresh.checkpoints else max(percentage, refresh.checkpoints[-1])
            )
        remaining = refresh.total - refresh.replaced
        answer = {
            "InstanceRefreshId": refresh.id,
            "AutoScalingGroupName": refresh.group,
            "Status": refresh.status,
            "StartTime": refresh.started,
            "PercentageComplete": percentage,
            "InstancesToUpdate": remaining,
            "ProgressDetails": {
                "LivePoolProgress": {
                    "PercentageComplete": percentage,
                    "InstancesToUpdate": remaining,
                }
            },
            "Preferences": refresh.preferences,
            "Strategy": refresh.strategy,
        }
        if refresh.reason:
            answer["StatusReason"] = refresh.reason
        if refresh.ended:
            answer["EndTime"] = refresh.ended
        if refresh.desired:
            answer["DesiredConfiguration"] = refresh.desired
        if refresh.rollback:
            back = refresh.replaced
            done = 100 if back == 0 else refresh.rolled_back * 100 // back
            answer["RollbackDetails"] = {
                "RollbackReason": refresh.rollback["reason"],
                "RollbackStartTime": refresh.rollback["started"],
                "PercentageCompleteOnRollback": done,
                "InstancesToUpdateOnRollback": back - refresh.rolled_back,
                "ProgressDetailsOnRollback": {
                    "LivePoolProgress": {
                        "PercentageComplete": done,
                        "InstancesToUpdate": back - refresh.rolled_back,
                    }
                },
            }
        return answer

    def _active(self, request, name) -> Refresh:
        for refresh in reversed(self.refreshes):
            if (refresh.account, refresh.region, refresh.group) == (
                request.account,
                request.region,
                name,
            ) and refresh.status in ACTIVE_REFRESH:
                return refresh
        raise ApiError(
            "ActiveInstanceRefreshNotFound",
            f"No in progress or pending Instance Refresh found for Auto Scaling group {name}",
        )

    def _CancelInstanceRefresh(self, request, params) -> dict:
        with self.lock:
            refresh = self._active(request, params["AutoScalingGroupName"])
            if refresh.status != "Cancelling":
                refresh.status = "Cancelling"
                refresh.reason = "Cancellation requested by the user."
                # The instances being replaced finish warming up before the refresh stops.
                refresh.wait_until = time.monotonic() + self._step_seconds(refresh)
            return {"InstanceRefreshId": refresh.id}

    def _RollbackInstanceRefresh(self, request, params) -> dict:
        name = params["AutoScalingGroupName"]
        with self.lock:
            refresh = self._active(request, name)
            if refresh.status in ("Cancelling", "RollbackInProgress"):
                raise ApiError(
                    "ActiveInstanceRefreshNotFound",
                    f"No in progress or pending Instance Refresh found for Auto Scaling group {name}",
                )
        why = self.irreversible(
            request.account, request.region, refresh.previous_template, refresh.desired
        )
        if why:
            raise ApiError(
                "IrreversibleInstanceRefresh",
                f"The instance refresh can't be rolled back because {why}.",
            )
        with self.lock:
            self._start_rollback(refresh, "Rollback requested by the user.")
            return {"InstanceRefreshId": refresh.id}

    def _start_rollback(self, refresh: Refresh, reason: str) -> None:
        refresh.status = "RollbackInProgress"
        refresh.reason = reason
        refresh.rollback = {"reason": reason, "started": now()}
        refresh.wait_until = time.monotonic() + self.tick

    # Time.

    def _batch(self, refresh: Refresh) -> int:
        minimum = refresh.preferences.get("MinHealthyPercentage", DEFAULT_MIN_HEALTHY)
        maximum = max(refresh.preferences.get("MaxHealthyPercentage") or 100, 100)
        return max(1, refresh.total * (maximum - minimum) // 100)

    def _step_seconds(self, refresh: Refresh) -> float:
        warmup = refresh.preferences.get("InstanceWarmup") or 0
        return max(self.tick, warmup * self.scale)

    def _alarm_firing(self, refresh: Refresh) -> str | None:
        alarms = (refresh.preferences.get("AlarmSpecification") or {}).get("Alarms") or []
        if not alarms:
            return None
        cloudwatch = self.moto.client("cloudwatch", refresh.region, refresh.account)
        for alarm in cloudwatch.describe_alarms(AlarmNames=alarms)["MetricAlarms"]:
            if alarm["StateValue"] == "ALARM":
                return alarm["AlarmName"]
        return None

    def advance(self) -> None:
        moment = time.monotonic()
        with self.lock:
            due = [r for r in self.refreshes if r.status in ACTIVE_REFRESH and r.next_at <= moment]
        for refresh in due:
            try:
                self._advance(refresh)
            except botocore.exceptions.BotoCoreError as error:
                print(f"asg_ecs_standin: refresh {refresh.id}: {error}", file=sys.stderr)

    def _advance(self, refresh: Refresh) -> None:
        """One tick of a refresh: alarms first, then whatever its status does next."""
        if refresh.status in ("InProgress", "Baking"):
            alarm = self._alarm_firing(refresh)
            if alarm:
                reason = f"The alarm {alarm} is in ALARM state."
                with self.lock:
                    if refresh.preferences.get("AutoRollback"):
                        self._start_rollback(refresh, reason)
                    else:
                        refresh.status, refresh.reason, refresh.ended = "Failed", reason, now()
                return
        finish = None
        with self.lock:
            moment = time.monotonic()
            refresh.next_at = moment + self.tick
            if moment < refresh.wait_until:
                return  # warming up, at a checkpoint, or baking
            status = refresh.status
            if status == "Pending":
                refresh.status = "InProgress"
            elif status == "Cancelling":
                refresh.status, refresh.reason, refresh.ended = (
                    "Cancelled",
                    "Instance refresh cancelled.",
                    now(),
                )
            elif status == "RollbackInProgress":
                refresh.rolled_back = min(
                    refresh.replaced, refresh.rolled_back + self._batch(refresh)
                )
                refresh.wait_until = moment + self._step_seconds(refresh)
                if refresh.rolled_back >= refresh.replaced:
                    finish = "rollback"
            elif status == "Baking":
                finish = "success"
            elif status == "InProgress":
                target = refresh.checkpoints[-1] if refresh.checkpoints else 100
                if self._percentage(refresh) < target:
                    refresh.replaced = min(refresh.total, refresh.replaced + self._batch(refresh))
                    refresh.reason = None
                    refresh.wait_until = moment + self._step_seconds(refresh)
                    percentage = self._percentage(refresh)
                    if percentage < target:
                        passed = [c for c in refresh.checkpoints if c <= percentage]
                        if passed and passed[-1] not in refresh.checkpoints_reached:
                            refresh.checkpoints_reached.append(passed[-1])
                            delay = refresh.preferences["CheckpointDelay"] * self.scale
                            refresh.reason = f"Checkpoint {passed[-1]}% reached, waiting for the checkpoint delay."
                            refresh.wait_until = moment + delay
                        return
                bake = (refresh.preferences.get("BakeTime") or 0) * self.scale
                if bake > 0:
                    refresh.status = "Baking"
                    refresh.reason = "Waiting for the bake time to elapse."
                    refresh.wait_until = moment + bake
                else:
                    finish = "success"
        # Finishing calls moto: outside the lock.
        if finish == "success":
            if refresh.desired and refresh.desired.get("LaunchTemplate"):
                self._asg(refresh).update_auto_scaling_group(
                    AutoScalingGroupName=refresh.group,
                    LaunchTemplate=refresh.desired["LaunchTemplate"],
                )
            with self.lock:
                refresh.status, refresh.reason, refresh.ended = "Successful", None, now()
        elif finish == "rollback":
            outcome = "RollbackSuccessful"
            reason = refresh.rollback["reason"]
            try:
                self._image_of(refresh.account, refresh.region, refresh.previous_template)
            except botocore.exceptions.ClientError:
                outcome = "RollbackFailed"
                reason = "The previous launch template version no longer exists."
            with self.lock:
                refresh.status, refresh.reason, refresh.ended = outcome, reason, now()


# --- ECS ------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    id: str
    task_definition: str
    desired: int
    created: Any
    status: str = "PRIMARY"
    rollout: str = "IN_PROGRESS"
    reason: str | None = None
    running: int = 0
    failed: int = 0
    failing: bool = False
    updated: Any = None
    # A rollback deployment is not watched by the alarms that started it (AWS would loop).
    rollback: bool = False


@dataclass
class EcsService:
    account: str
    region: str
    cluster: str
    name: str
    configuration: dict
    deployments: list[Deployment]
    events: list[dict] = field(default_factory=list)
    next_at: float = 0.0


class Ecs:
    OPERATIONS = {"CreateService", "UpdateService", "DescribeServices"}

    def __init__(self, moto: standin.Moto, upstream: str, tick: float):
        self.moto = moto
        self.upstream = upstream
        self.tick = tick
        self.services: dict[tuple[str, str, str, str], EcsService] = {}
        self.lock = threading.RLock()
        self._ids = itertools.count(1)

    def _new_deployment(self, account, region, task_definition: str, desired: int) -> Deployment:
        return Deployment(
            id=f"ecs-svc/{next(self._ids):019d}",
            task_definition=task_definition,
            desired=desired,
            created=now(),
            updated=now(),
            failing=self._fails(account, region, task_definition),
        )

    def _fails(self, account, region, task_definition: str) -> bool:
        ecs = self.moto.client("ecs", region, account)
        described = ecs.describe_task_definition(taskDefinition=task_definition)["taskDefinition"]
        for container in described.get("containerDefinitions", []):
            if FAIL_IMAGE_MARKER in container.get("image", ""):
                return True
            for variable in container.get("environment", []):
                if variable.get("name") == FAIL_ENVIRONMENT and variable.get("value") == "true":
                    return True
        return False

    def _event(self, service: EcsService, message: str) -> None:
        service.events.insert(0, {"id": str(uuid.uuid4()), "createdAt": now(), "message": message})

    def handle(self, request: Request, name: str, params: dict) -> Response:
        account, region = request.account, request.region
        if name == "DescribeServices":
            response = standin.forward(self.upstream, request)
            if response.status == 200:
                answer = json.loads(response.body)
                cluster = _last(params.get("cluster") or "default")
                for service in answer.get("services", []):
                    key = (account, region, cluster, service["serviceName"])
                    with self.lock:
                        tracked = self.services.get(key) or self._adopt(key, service)
                        self._overlay(service, tracked)
                response = standin.json_response(200, answer, "application/x-amz-json-1.1")
            return response

        cluster = _last(params.get("cluster") or "default")
        service_name = _last(params.get("serviceName") or params.get("service") or "")
        key = (account, region, cluster, service_name)
        if name == "UpdateService" and key not in self.services:
            ecs = self.moto.client("ecs", region, account)
            found = ecs.describe_services(cluster=cluster, services=[service_name])["services"]
            if found:
                with self.lock:
                    self._adopt(key, found[0])
        response = standin.forward(self.upstream, request)
        if response.status != 200:
            return response
        answer = json.loads(response.body)
        service = answer["service"]
        configuration = params.get("deploymentConfiguration")
        with self.lock:
            if name == "CreateService":
                tracked = EcsService(
                    account, region, cluster, service_name, configuration or {}, []
                )
                first = self._new_deployment(
                    account, region, service["taskDefinition"], service["desiredCount"]
                )
                tracked.deployments.append(first)
                tracked.next_at = time.monotonic() + self.tick
                self.services[key] = tracked
                self._event(
                    tracked, f"(service {service_name}) has started a deployment {first.id}."
                )
            else:
                tracked = self.services[key]
                if configuration is not None:
                    tracked.configuration = configuration
                primary = tracked.deployments[0]
                new_definition = service["taskDefinition"] != primary.task_definition
                if new_definition or params.get("forceNewDeployment"):
                    for deployment in tracked.deployments:
                        deployment.status = "ACTIVE"
                    fresh = self._new_deployment(
                        account, region, service["taskDefinition"], service["desiredCount"]
                    )
                    tracked.deployments.insert(0, fresh)
                    tracked.next_at = time.monotonic() + self.tick
                    self._event(
                        tracked, f"(service {service_name}) has started a deployment {fresh.id}."
                    )
                else:
                    primary.desired = service["desiredCount"]
                    if primary.rollout == "COMPLETED" and primary.running != primary.desired:
                        primary.running = primary.desired
            self._overlay(service, tracked)
        return standin.json_response(200, answer, "application/x-amz-json-1.1")

    def _adopt(self, key: tuple[str, str, str, str], service: dict) -> EcsService:
        """Tracks a service made in moto directly: its current task definition is a completed
        deployment running the desired count (what moto would show once stable)."""
        account, region, cluster, name = key
        deployment = self._new_deployment(
            account, region, service["taskDefinition"], service["desiredCount"]
        )
        deployment.rollout, deployment.running = "COMPLETED", service["desiredCount"]
        tracked = EcsService(account, region, cluster, name, {}, [deployment])
        self.services[key] = tracked
        return tracked

    def _overlay(self, service: dict, tracked: EcsService) -> None:
        deployments = []
        for deployment in tracked.deployments:
            entry = {
                "id": deployment.id,
                "status": deployment.status,
                "taskDefinition": deployment.task_definition,
                "desiredCount": deployment.desired,
                "pendingCount": 0
                if deployment.rollout != "IN_PROGRESS"
                else max(0, deployment.desired - deployment.running),
                "runningCount": deployment.running,
                "failedTasks": deployment.failed,
                "createdAt": deployment.created,
                "updatedAt": deployment.updated,
                "rolloutState": deployment.rollout,
            }
            if deployment.reason:
                entry["rolloutStateReason"] = deployment.reason
            for key in ("launchType", "networkConfiguration", "platformVersion"):
                if key in service:
                    entry[key] = service[key]
            deployments.append(entry)
        service["deployments"] = deployments
        service["taskDefinition"] = tracked.deployments[0].task_definition
        service["runningCount"] = sum(d.running for d in tracked.deployments)
        service["pendingCount"] = sum(
            e["pendingCount"] for e in deployments if e["status"] == "PRIMARY"
        )
        if tracked.configuration:
            service["deploymentConfiguration"] = tracked.configuration
        service["events"] = tracked.events[:100]

    # Time.

    def advance(self) -> None:
        moment = time.monotonic()
        with self.lock:
            due = [s for s in self.services.values() if s.next_at and s.next_at <= moment]
        for service in due:
            try:
                self._advance(service)
            except botocore.exceptions.BotoCoreError as error:
                print(f"asg_ecs_standin: service {service.name}: {error}", file=sys.stderr)

    def _alarm_firing(self, service: EcsService) -> str | None:
        alarms = service.configuration.get("alarms") or {}
        if not alarms.get("enable") or not alarms.get("alarmNames"):
            return None
        cloudwatch = self.moto.client("cloudwatch", service.region, service.account)
        for alarm in cloudwatch.describe_alarms(AlarmNames=alarms["alarmNames"])["MetricAlarms"]:
            if alarm["StateValue"] == "ALARM":
                return alarm["AlarmName"]
        return None

    def _advance(self, service: EcsService) -> None:
        primary = service.deployments[0]
        if primary.rollout != "IN_PROGRESS":
            service.next_at = 0.0
            return
        alarm = None if primary.rollback else self._alarm_firing(service)
        rollback_to = None
        with self.lock:
            primary.updated = now()
            breaker = service.configuration.get("deploymentCircuitBreaker") or {}
            alarms = service.configuration.get("alarms") or {}
            if alarm:
                primary.rollout = "FAILED"
                primary.reason = f"ECS deployment detected triggered alarms: {alarm}."
                if alarms.get("rollback"):
                    rollback_to = self._previous(service)
            elif primary.failing:
                primary.failed += 1
                threshold = min(
                    CIRCUIT_BREAKER_MAX, max(CIRCUIT_BREAKER_MIN, math.ceil(primary.desired / 2))
                )
                self._event(
                    service,
                    f"(service {service.name}) deployment {primary.id} task failed to start.",
                )
                if breaker.get("enable") and primary.failed >= threshold:
                    primary.rollout = "FAILED"
                    primary.reason = "ECS deployment circuit breaker: tasks failed to start."
                    if breaker.get("rollback") and not primary.rollback:
                        rollback_to = self._previous(service)
            else:
                primary.running = min(primary.desired, primary.running + 1)
                # Old tasks stop as new ones run, oldest deployment first.
                for old in reversed(service.deployments[1:]):
                    if sum(d.running for d in service.deployments) <= primary.desired:
                        break
                    old.running = max(0, old.running - 1)
                if primary.running >= primary.desired:
                    primary.rollout = "COMPLETED"
                    primary.reason = "ECS deployment " + primary.id + " completed."
                    service.deployments = [primary]
                    self._event(service, f"(service {service.name}) has reached a steady state.")
            if primary.rollout == "FAILED":
                self._event(
                    service,
                    f"(service {service.name}) deployment {primary.id} failed: {primary.reason}",
                )
                if rollback_to is None:
                    service.next_at = 0.0
                    return
                fresh = self._new_deployment(
                    service.account, service.region, rollback_to.task_definition, primary.desired
                )
                fresh.reason = f"ECS deployment circuit breaker: rolling back to deploymentId {rollback_to.id}."
                if alarm:
                    fresh.reason = (
                        f"ECS deployment alarms: rolling back to deploymentId {rollback_to.id}."
                    )
                fresh.running = rollback_to.running
                fresh.rollback = True
                for deployment in service.deployments:
                    deployment.status = "ACTIVE"
                service.deployments = [fresh] + [
                    d for d in service.deployments if d is not rollback_to
                ]
                self._event(
                    service,
                    f"(service {service.name}) rolling back to deployment {rollback_to.id}.",
                )
            service.next_at = (
                time.monotonic() + self.tick
                if service.deployments[0].rollout == "IN_PROGRESS"
                else 0.0
            )
        if rollback_to is not None:
            ecs = self.moto.client("ecs", service.region, service.account)
            ecs.update_service(
                cluster=service.cluster,
                service=service.name,
                taskDefinition=rollback_to.task_definition,
            )

    @staticmethod
    def _previous(service: EcsService) -> Deployment | None:
        for deployment in service.deployments[1:]:
            if deployment.rollout == "COMPLETED":
                return deployment
        return None


# --- the server -----------------------------------------------------------------------------------


class AsgEcsStandin:
    def __init__(self, upstream: str, tick: float, scale: float):
        self.upstream = upstream
        self.moto = standin.Moto(upstream)
        self.autoscaling_api = standin.Api("autoscaling")
        self.ecs_api = standin.Api("ecs", validation_code="InvalidParameterException")
        self.autoscaling = AutoScaling(self.moto, tick, scale)
        self.ecs = Ecs(self.moto, upstream, tick)
        self.tick = tick
        threading.Thread(target=self._clock, daemon=True).start()

    def _clock(self) -> None:
        while True:
            time.sleep(min(self.tick / 4, 0.25))
            self.autoscaling.advance()
            self.ecs.advance()

    def handle(self, request: Request) -> Response:
        service = request.signing_service
        if service == "autoscaling":
            api, handler = self.autoscaling_api, self.autoscaling
        elif service == "ecs" or (request.headers.get("X-Amz-Target") or "").startswith(
            "AmazonEC2ContainerService"
        ):
            api, handler = self.ecs_api, self.ecs
        else:
            return standin.forward(self.upstream, request)
        try:
            found = api.parse_and_validate(request)
            if found is None or found[0].name not in handler.OPERATIONS:
                return standin.forward(self.upstream, request)
            operation, params = found
            if handler is self.ecs:
                return self.ecs.handle(request, operation.name, params)
            return api.respond(operation, self.autoscaling.handle(request, operation.name, params))
        except ApiError as error:
            return api.error(error)
        except botocore.exceptions.ClientError as error:
            # moto refused one of this stand-in's own calls: pass its verdict on.
            details = error.response.get("Error", {})
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400)
            return api.error(
                ApiError(
                    details.get("Code", "ValidationError"),
                    details.get("Message", str(error)),
                    status,
                )
            )


def main(argv: list[str]) -> None:
    parser = standin.common_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--tick", type=float, default=0.5, help="seconds per replaced batch / started task"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="factor for CheckpointDelay, BakeTime, InstanceWarmup",
    )
    args = parser.parse_args(argv)
    server = AsgEcsStandin(args.upstream, args.tick, args.time_scale)
    standin.serve(args.port, server.handle, args.verbose)


if __name__ == "__main__":
    main(sys.argv[1:])
