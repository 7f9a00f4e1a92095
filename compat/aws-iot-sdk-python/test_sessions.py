"""Persistent sessions, as AWS IoT Core keeps them: a device built with
AWS's SDK that connects with `clean_session=False` gets, when it comes
back, the QoS 1 messages sent to it while it was away (here, shadow deltas
from `fleet shadow update`), also across a restart of `fleet serve`; with
a clean session it does not. The embedded broker (an external broker keeps
sessions by its own configuration)."""

import json
import time

import pytest

from conftest import QOS, TIMEOUT, Cloud, Inbox, subscribed

THING = "aws-session"
DELTA = f"$aws/things/{THING}/shadow/update/delta"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    c = Cloud(tmp_path_factory.mktemp("cloud-sessions"), "embedded")
    yield c
    c.stop()


def deltas():
    inbox = Inbox()

    def on_message(topic, payload, **_kwargs):
        if topic == DELTA:
            inbox(json.loads(payload)["state"])
    return inbox, on_message


def away(conn):
    conn.disconnect().result(TIMEOUT)


def test_a_persistent_session_gets_what_was_sent_while_away(cloud):
    # The first connection makes the session and subscribes.
    inbox, on_message = deltas()
    conn = cloud.device(THING, clean_session=False, on_message=on_message)
    subscribed(conn.subscribe(DELTA, QOS, lambda **_kw: None))
    away(conn)

    # Away: the operator sets desired state; the delta waits.
    cloud.cli("shadow", "update", THING, '{"speed": 1}')
    inbox, on_message = deltas()
    conn = cloud.device(THING, clean_session=False, on_message=on_message)
    assert conn.session_present, "the session was kept"
    assert inbox.take() == {"speed": 1}
    away(conn)

    # Away again, and fleet serve restarts meanwhile: still there.
    cloud.cli("shadow", "update", THING, '{"speed": 2}')
    time.sleep(0.5)
    cloud.restart_serve()
    inbox, on_message = deltas()
    conn = cloud.device(THING, clean_session=False, on_message=on_message)
    assert conn.session_present, "the session survived the restart"
    assert inbox.take() == {"speed": 2}
    away(conn)


def test_a_clean_session_gets_nothing_sent_while_away(cloud):
    inbox, on_message = deltas()
    conn = cloud.device(THING, clean_session=True, on_message=on_message)
    assert not conn.session_present
    subscribed(conn.subscribe(DELTA, QOS, lambda **_kw: None))
    away(conn)
    cloud.cli("shadow", "update", THING, '{"speed": 3}')
    inbox, on_message = deltas()
    conn = cloud.device(THING, clean_session=True, on_message=on_message)
    assert not conn.session_present
    time.sleep(2)
    assert inbox.items == []
    away(conn)
