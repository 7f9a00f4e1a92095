"""fleet-core's tools from Python: keys, manifests, shadow rules."""

import json

import pytest

import fleet


def test_manifests_sign_and_verify():
    k = fleet.generate_signing_key()
    assert fleet.public_key_of(k.secret_key) == k.public_key
    root = fleet.trust_root_for_key(k.public_key)
    image = b"firmware" * 100
    env = fleet.sign_manifest(fleet.manifest_for_image("fw", "1.2.0", 5, image, ["p100"]), [k.secret_key])
    info = fleet.verify_manifest(root, env, "p100", 4, 1 << 20, None)
    assert (info.component, info.version, info.sequence, info.size) == ("fw", "1.2.0", 5, len(image))
    with pytest.raises(fleet.FleetError.Rejected):
        fleet.verify_manifest(root, env, "p100", 5, 1 << 20, None)  # not newer
    with pytest.raises(fleet.FleetError.Rejected):
        fleet.verify_image(info, image + b"x")
    with pytest.raises(fleet.FleetError.InvalidArgument):
        fleet.public_key_of(b"short")


def test_shadow_rules():
    out = fleet.shadow_process(None, "pump-7", fleet.ShadowOperation.UPDATE,
                               '{"state": {"desired": {"on": true}}}', 1_700_000_000)
    assert [m.topic for m in out.messages] == ["update/accepted", "update/delta", "update/documents"]
    assert json.loads(out.messages[1].payload)["state"] == {"on": True}
    missing = fleet.shadow_process(None, "pump-7", fleet.ShadowOperation.GET, "", 1_700_000_000)
    assert json.loads(missing.messages[0].payload)["message"] == "No shadow exists with name: 'pump-7'"
    assert fleet.shadow_delta('{"on": true, "speed": 3}', '{"on": true}') == '{"speed":3}'
    assert fleet.is_valid_thing_name("pump-7") and not fleet.is_valid_thing_name("pump/7")
