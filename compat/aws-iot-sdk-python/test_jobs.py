"""Jobs: AWS's `IotJobsClient` against a fleet cloud, as AWS's jobs sample
drives it: notify-next, get pending, `$next/get`, start-next, update with
expected versions, describe; jobs are created with `fleet job create`.
Every reply is parsed by the SDK's own models."""

import json

from awsiot import iotjobs

from conftest import QOS, Inbox, subscribed

THING = "aws-jobs"


def test_the_aws_sdk_jobs_client_runs_two_jobs(cloud):
    conn = cloud.device(THING)
    try:
        jobs = iotjobs.IotJobsClient(conn)
        nxt, pending, started, updated, refused = Inbox(), Inbox(), Inbox(), Inbox(), Inbox()
        described, describe_refused = Inbox(), Inbox()
        thing = {"thing_name": THING}
        subscribed(jobs.subscribe_to_next_job_execution_changed_events(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(**thing), QOS, nxt))
        subscribed(jobs.subscribe_to_get_pending_job_executions_accepted(
            iotjobs.GetPendingJobExecutionsSubscriptionRequest(**thing), QOS, pending))
        subscribed(jobs.subscribe_to_start_next_pending_job_execution_accepted(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(**thing), QOS, started))
        subscribed(jobs.subscribe_to_update_job_execution_accepted(
            iotjobs.UpdateJobExecutionSubscriptionRequest(job_id="+", **thing), QOS, updated))
        subscribed(jobs.subscribe_to_update_job_execution_rejected(
            iotjobs.UpdateJobExecutionSubscriptionRequest(job_id="+", **thing), QOS, refused))
        subscribed(jobs.subscribe_to_describe_job_execution_accepted(
            iotjobs.DescribeJobExecutionSubscriptionRequest(job_id="+", **thing), QOS, described))
        subscribed(jobs.subscribe_to_describe_job_execution_rejected(
            iotjobs.DescribeJobExecutionSubscriptionRequest(job_id="+", **thing), QOS,
            describe_refused))

        # Nothing yet: $next/get answers with no execution.
        jobs.publish_describe_job_execution(iotjobs.DescribeJobExecutionRequest(
            job_id="$next", client_token="d0", **thing), QOS).result(15)
        assert described.take(lambda d: d.client_token == "d0").execution is None

        cloud.cli("job", "create", "aws-1", '{"operation": "reboot"}', "--thing", THING)
        cloud.cli("job", "create", "aws-2", '{"operation": "blink", "times": 3}',
                  "--thing", THING)

        # The device is told of the first.
        n = nxt.take(lambda n: n.execution is not None)
        assert n.execution.job_id == "aws-1"
        assert n.execution.status == iotjobs.JobStatus.QUEUED
        assert n.execution.job_document == {"operation": "reboot"}
        assert n.execution.queued_at.year >= 2024

        jobs.publish_get_pending_job_executions(iotjobs.GetPendingJobExecutionsRequest(
            client_token="p1", **thing), QOS).result(15)
        p = pending.take(lambda p: p.client_token == "p1")
        assert [j.job_id for j in p.queued_jobs] == ["aws-1", "aws-2"]
        assert p.in_progress_jobs == []
        assert all(j.execution_number == 1 and j.version_number == 1 for j in p.queued_jobs)

        # As the AWS OTA library asks for its job: $next/get.
        jobs.publish_describe_job_execution(iotjobs.DescribeJobExecutionRequest(
            job_id="$next", include_job_document=True, client_token="d1", **thing),
            QOS).result(15)
        d = described.take(lambda d: d.client_token == "d1")
        assert (d.execution.job_id, d.execution.status) == ("aws-1", iotjobs.JobStatus.QUEUED)
        assert d.execution.job_document == {"operation": "reboot"}

        # start-next starts it, with the details given.
        jobs.publish_start_next_pending_job_execution(iotjobs.StartNextPendingJobExecutionRequest(
            client_token="s1", status_details={"step": "rebooting"}, **thing), QOS).result(15)
        s = started.take(lambda s: s.client_token == "s1")
        assert s.execution.job_id == "aws-1"
        assert s.execution.status == iotjobs.JobStatus.IN_PROGRESS
        assert s.execution.status_details == {"step": "rebooting"}
        assert s.execution.version_number == 2
        assert s.execution.started_at is not None

        jobs.publish_update_job_execution(iotjobs.UpdateJobExecutionRequest(
            job_id="aws-1", status=iotjobs.JobStatus.SUCCEEDED, expected_version=2,
            include_job_execution_state=True, client_token="u1", **thing), QOS).result(15)
        u = updated.take(lambda u: u.client_token == "u1")
        assert u.execution_state.status == iotjobs.JobStatus.SUCCEEDED
        assert u.execution_state.version_number == 3

        # The second is next now.
        n = nxt.take(lambda n: n.execution is not None and n.execution.job_id == "aws-2")
        assert n.execution.job_document == {"operation": "blink", "times": 3}

        # An update at a stale version is refused with AWS's code and state.
        jobs.publish_update_job_execution(iotjobs.UpdateJobExecutionRequest(
            job_id="aws-2", status=iotjobs.JobStatus.IN_PROGRESS, client_token="u2",
            **thing), QOS).result(15)
        updated.take(lambda u: u.client_token == "u2")
        # Describe by id, while it runs.
        jobs.publish_describe_job_execution(iotjobs.DescribeJobExecutionRequest(
            job_id="aws-2", client_token="d2", **thing), QOS).result(15)
        d = described.take(lambda d: d.client_token == "d2")
        assert d.execution.status == iotjobs.JobStatus.IN_PROGRESS
        assert d.execution.job_document == {"operation": "blink", "times": 3}
        jobs.publish_update_job_execution(iotjobs.UpdateJobExecutionRequest(
            job_id="aws-2", status=iotjobs.JobStatus.FAILED, expected_version=1,
            client_token="stale", **thing), QOS).result(15)
        e = refused.take(lambda e: e.client_token == "stale")
        assert e.code == iotjobs.RejectedErrorCode.VERSION_MISMATCH
        assert e.execution_state.status == iotjobs.JobStatus.IN_PROGRESS
        assert e.execution_state.version_number == 2

        jobs.publish_update_job_execution(iotjobs.UpdateJobExecutionRequest(
            job_id="aws-2", status=iotjobs.JobStatus.FAILED,
            status_details={"reason": "no LED"}, client_token="u3", **thing), QOS).result(15)
        updated.take(lambda u: u.client_token == "u3")
        # Nothing is pending any more: notify-next says so.
        nxt.take(lambda n: n.execution is None)

        # AWS's Jobs device API: describing an execution in a terminal state
        # is refused with TerminalStateReached ("a command to describe a job
        # is performed on a job that is in a terminal state"); an unknown
        # job with ResourceNotFound.
        jobs.publish_describe_job_execution(iotjobs.DescribeJobExecutionRequest(
            job_id="aws-2", client_token="d3", **thing), QOS).result(15)
        e = describe_refused.take(lambda e: e.client_token == "d3")
        assert e.code == iotjobs.RejectedErrorCode.TERMINAL_STATE_REACHED
        jobs.publish_describe_job_execution(iotjobs.DescribeJobExecutionRequest(
            job_id="nope", client_token="d4", **thing), QOS).result(15)
        e = describe_refused.take(lambda e: e.client_token == "d4")
        assert e.code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND

        # The cloud's view agrees.
        for job, status in [("aws-1", "SUCCEEDED"), ("aws-2", "FAILED")]:
            text = json.dumps(cloud.cli("job", "executions", job))
            assert status in text, text
    finally:
        conn.disconnect().result(15)
