"""Device Shadow answers exactly as the AWS IoT Developer Guide documents
them (Device Shadow service documents, the shadow MQTT topics, the shadow
error messages), checked over an AWS SDK MQTT connection with the raw JSON,
since the SDK's models drop what they do not know (`metadata.delta`) and
cannot send a malformed `state`."""

import json

from conftest import QOS, TIMEOUT, Inbox, subscribed

THING = "aws-parity"
SHADOW = f"$aws/things/{THING}/shadow"
NAMED = f"{SHADOW}/name/cfg"


def test_shadow_answers_are_the_documented_ones(cloud):
    conn = cloud.device(THING)
    try:
        inbox = Inbox()

        def on_message(topic, payload, **_kwargs):
            inbox((topic, json.loads(payload)))

        for base in (SHADOW, NAMED):
            for reply in ("get/accepted", "get/rejected", "update/accepted",
                          "update/rejected", "delete/rejected"):
                subscribed(conn.subscribe(f"{base}/{reply}", QOS, on_message))

        def ask(base, op, body):
            future, _ = conn.publish(f"{base}/{op}", json.dumps(body), QOS)
            future.result(TIMEOUT)

        def answer(token):
            return inbox.take(lambda m: m[1].get("clientToken") == token)

        # get and delete of a shadow that does not exist: 404 "No shadow
        # exists with name: '<thing>'"; a named shadow is named by its name.
        ask(SHADOW, "get", {"clientToken": "g0"})
        topic, body = answer("g0")
        assert topic == f"{SHADOW}/get/rejected"
        assert (body["code"], body["message"]) == (404, f"No shadow exists with name: '{THING}'")
        ask(SHADOW, "delete", {"clientToken": "x0"})
        topic, body = answer("x0")
        assert topic == f"{SHADOW}/delete/rejected"
        assert (body["code"], body["message"]) == (404, f"No shadow exists with name: '{THING}'")
        ask(NAMED, "get", {"clientToken": "g1"})
        topic, body = answer("g1")
        assert topic == f"{NAMED}/get/rejected"
        assert (body["code"], body["message"]) == (404, "No shadow exists with name: 'cfg'")

        # A state node other than desired and reported: 400 "State contains
        # an invalid node: 'foo'", and nothing is stored.
        ask(SHADOW, "update", {"state": {"foo": {"y": 1}, "reported": {"x": 1}},
                               "clientToken": "u0"})
        topic, body = answer("u0")
        assert topic == f"{SHADOW}/update/rejected"
        assert (body["code"], body["message"]) == (400, "State contains an invalid node: 'foo'")
        ask(SHADOW, "get", {"clientToken": "g2"})
        assert answer("g2")[1]["code"] == 404

        # get/accepted carries metadata.delta: the timestamps of the desired
        # leaves that make up the delta, nested like the delta.
        ask(SHADOW, "update", {"state": {"desired": {"color": "red",
                                                     "led": {"on": True, "level": 3}}},
                               "clientToken": "u1"})
        assert answer("u1")[0] == f"{SHADOW}/update/accepted"
        ask(SHADOW, "update", {"state": {"reported": {"color": "red",
                                                      "led": {"on": True, "level": 1}}},
                               "clientToken": "u2"})
        assert answer("u2")[0] == f"{SHADOW}/update/accepted"
        ask(SHADOW, "get", {"clientToken": "g3"})
        topic, body = answer("g3")
        assert topic == f"{SHADOW}/get/accepted"
        assert body["state"]["delta"] == {"led": {"level": 3}}
        level_set_at = body["metadata"]["desired"]["led"]["level"]["timestamp"]
        assert body["metadata"]["delta"] == {"led": {"level": {"timestamp": level_set_at}}}

        # "desired": null: update/accepted carries metadata.desired with the
        # update's timestamp.
        ask(SHADOW, "update", {"state": {"desired": None}, "clientToken": "u3"})
        topic, body = answer("u3")
        assert topic == f"{SHADOW}/update/accepted"
        assert body["state"] == {"desired": None}
        assert body["metadata"] == {"desired": {"timestamp": body["timestamp"]}}
        ask(SHADOW, "get", {"clientToken": "g4"})
        topic, body = answer("g4")
        assert "desired" not in body["state"] and "delta" not in body["state"]
        assert "delta" not in body["metadata"]
    finally:
        conn.disconnect().result(TIMEOUT)
