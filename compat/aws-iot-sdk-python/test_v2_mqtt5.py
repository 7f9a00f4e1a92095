"""AWS's newer service clients (`IotShadowClientV2`, `IotJobsClientV2`) on
an MQTT 5 client, as AWS now recommends: request-response operations that
correlate replies by client token, and streams for events. Against a fleet
cloud with its embedded broker and with Mosquitto."""

import threading

import pytest
from awscrt import mqtt_request_response
from awsiot import ServiceStreamOptions, V2ServiceException, iotjobs, iotshadow

from conftest import TIMEOUT, Inbox, rr_options

THING = "aws-next"


@pytest.fixture
def client(cloud):
    things = cloud.dir / "things"
    with cloud.mqtt5(THING, things / f"{THING}.pem", things / f"{THING}.key") as c:
        yield c


def open_stream(create, request, events: Inbox):
    """Opens a V2 stream; returns it once its subscription is established."""
    established = threading.Event()

    def status(e):
        if e.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            established.set()

    stream = create(request, ServiceStreamOptions(
        incoming_event_listener=events, subscription_status_listener=status))
    stream.open()
    assert established.wait(TIMEOUT), "the stream's subscription was not established"
    return stream


def test_the_v2_shadow_client_on_a_named_shadow(cloud, client):
    shadow = iotshadow.IotShadowClientV2(client, rr_options())
    named = {"thing_name": THING, "shadow_name": "config"}
    deltas = Inbox()
    stream = open_stream(shadow.create_named_shadow_delta_updated_stream,
                         iotshadow.NamedShadowDeltaUpdatedSubscriptionRequest(**named), deltas)

    r = shadow.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
        state=iotshadow.ShadowState(reported={"mode": "normal"}), **named)).result(TIMEOUT)
    assert r.version == 1 and r.state.reported == {"mode": "normal"}

    cloud.cli("shadow", "update", THING, '{"mode": "eco"}', "--name", "config")
    d = deltas.take()
    assert (d.state, d.version) == ({"mode": "eco"}, 2)

    g = shadow.get_named_shadow(iotshadow.GetNamedShadowRequest(**named)).result(TIMEOUT)
    assert g.state.desired == {"mode": "eco"} and g.state.delta == {"mode": "eco"}

    # A refusal completes the future with AWS's modeled error.
    with pytest.raises(V2ServiceException) as refused:
        shadow.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
            version=1, state=iotshadow.ShadowState(reported={"mode": "eco"}),
            **named)).result(TIMEOUT)
    assert refused.value.modeled_error.code == 409

    gone = shadow.delete_named_shadow(iotshadow.DeleteNamedShadowRequest(**named)).result(TIMEOUT)
    assert gone.version == 2
    with pytest.raises(V2ServiceException) as missing:
        shadow.get_named_shadow(iotshadow.GetNamedShadowRequest(**named)).result(TIMEOUT)
    assert missing.value.modeled_error.code == 404


def test_the_v2_jobs_client_runs_a_job(cloud, client):
    jobs = iotjobs.IotJobsClientV2(client, rr_options())
    thing = {"thing_name": THING}
    nxt = Inbox()
    stream = open_stream(jobs.create_next_job_execution_changed_stream,
                         iotjobs.NextJobExecutionChangedSubscriptionRequest(**thing), nxt)

    cloud.cli("job", "create", "aws-v2", '{"operation": "rotate-logs"}', "--thing", THING)
    n = nxt.take(lambda n: n.execution is not None)
    assert n.execution.job_id == "aws-v2"

    d = jobs.describe_job_execution(iotjobs.DescribeJobExecutionRequest(
        job_id="$next", **thing)).result(TIMEOUT)
    assert (d.execution.job_id, d.execution.status) == ("aws-v2", iotjobs.JobStatus.QUEUED)
    assert d.execution.job_document == {"operation": "rotate-logs"}

    s = jobs.start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(**thing)).result(TIMEOUT)
    assert s.execution.status == iotjobs.JobStatus.IN_PROGRESS

    u = jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        job_id="aws-v2", status=iotjobs.JobStatus.SUCCEEDED, expected_version=s.execution.version_number,
        include_job_execution_state=True, **thing)).result(TIMEOUT)
    assert u.execution_state.status == iotjobs.JobStatus.SUCCEEDED
    nxt.take(lambda n: n.execution is None)

    p = jobs.get_pending_job_executions(
        iotjobs.GetPendingJobExecutionsRequest(**thing)).result(TIMEOUT)
    assert p.queued_jobs == [] and p.in_progress_jobs == []

    with pytest.raises(V2ServiceException) as refused:
        jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
            job_id="aws-v2", status=iotjobs.JobStatus.FAILED, **thing)).result(TIMEOUT)
    assert refused.value.modeled_error.code == iotjobs.RejectedErrorCode.INVALID_STATE_TRANSITION
