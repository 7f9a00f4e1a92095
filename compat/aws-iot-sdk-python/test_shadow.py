"""Device Shadow: AWS's `IotShadowClient` against a fleet cloud. The
device reports, the operator sets desired state through `fleet shadow
update`, the device gets the delta, gets the document, is refused a stale
version, and deletes the shadow; every reply is parsed by the SDK's own
models."""

from awsiot import iotshadow

from conftest import QOS, Inbox, subscribed

THING = "aws-shadow"


def test_the_aws_sdk_shadow_client_round_trip(cloud):
    conn = cloud.device(THING)
    try:
        shadow = iotshadow.IotShadowClient(conn)
        accepted, rejected, deltas, documents = Inbox(), Inbox(), Inbox(), Inbox()
        got, deleted = Inbox(), Inbox()
        subscribed(shadow.subscribe_to_update_shadow_accepted(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=THING), QOS, accepted))
        subscribed(shadow.subscribe_to_update_shadow_rejected(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=THING), QOS, rejected))
        subscribed(shadow.subscribe_to_shadow_delta_updated_events(
            iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=THING), QOS, deltas))
        subscribed(shadow.subscribe_to_shadow_updated_events(
            iotshadow.ShadowUpdatedSubscriptionRequest(thing_name=THING), QOS, documents))
        subscribed(shadow.subscribe_to_get_shadow_accepted(
            iotshadow.GetShadowSubscriptionRequest(thing_name=THING), QOS, got))
        subscribed(shadow.subscribe_to_delete_shadow_accepted(
            iotshadow.DeleteShadowSubscriptionRequest(thing_name=THING), QOS, deleted))

        # The device reports.
        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=THING, client_token="r1",
            state=iotshadow.ShadowState(reported={"speed": 1, "fw": "1.0"})), QOS).result(15)
        r = accepted.take(lambda r: r.client_token == "r1")
        assert r.version == 1
        assert r.state.reported == {"speed": 1, "fw": "1.0"}
        assert r.timestamp is not None and r.timestamp.year >= 2024
        assert set(r.metadata.reported) == {"speed", "fw"}
        doc = documents.take()
        assert doc.previous is None or doc.previous.version in (None, 0)
        assert doc.current.version == 1
        assert doc.current.state.reported == {"speed": 1, "fw": "1.0"}

        # The operator wants another speed: the device gets the delta.
        cloud.cli("shadow", "update", THING, '{"speed": 3}')
        d = deltas.take()
        assert d.state == {"speed": 3}
        assert d.version == 2
        assert "speed" in d.metadata

        # The device catches up; desired and reported agree, no delta.
        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=THING, client_token="r2", version=2,
            state=iotshadow.ShadowState(reported={"speed": 3})), QOS).result(15)
        r = accepted.take(lambda r: r.client_token == "r2")
        assert r.version == 3

        shadow.publish_get_shadow(iotshadow.GetShadowRequest(
            thing_name=THING, client_token="g1"), QOS).result(15)
        g = got.take(lambda g: g.client_token == "g1")
        assert g.version == 3
        assert g.state.desired == {"speed": 3}
        assert g.state.reported == {"speed": 3, "fw": "1.0"}
        assert g.state.delta is None

        # A stale version is refused with AWS's code.
        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=THING, client_token="stale", version=1,
            state=iotshadow.ShadowState(reported={"speed": 9})), QOS).result(15)
        e = rejected.take(lambda e: e.client_token == "stale")
        assert e.code == 409
        assert e.message

        # A null removes a key (the SDK's own way of sending null).
        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=THING, client_token="r3",
            state=iotshadow.ShadowState(reported={"fw": None}, reported_is_nullable=True)),
            QOS).result(15)
        accepted.take(lambda r: r.client_token == "r3")
        shadow.publish_get_shadow(iotshadow.GetShadowRequest(
            thing_name=THING, client_token="g2"), QOS).result(15)
        assert got.take(lambda g: g.client_token == "g2").state.reported == {"speed": 3}

        shadow.publish_delete_shadow(iotshadow.DeleteShadowRequest(
            thing_name=THING, client_token="del"), QOS).result(15)
        gone = deleted.take(lambda x: x.client_token == "del")
        assert gone.version == 4  # the version it had
    finally:
        conn.disconnect().result(15)
