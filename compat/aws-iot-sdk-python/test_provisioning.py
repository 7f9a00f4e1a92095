"""Fleet provisioning by claim: AWS's `IotIdentityClient` over MQTT 3.1.1
(as AWS's fleet provisioning sample does it) against `fleet serve` with its
embedded broker, which routes each reply to its requester. The device then
connects with the certificate it got, under the thing name the template
gave it, and uses its shadow.

As with AWS IoT, the embedded broker knows a device by the thing its
certificate is bound to, not by the certificate's subject: here the CSR
names a serial number, the template names the thing `thing-{SerialNumber}`,
and the device connects as that thing. (With Mosquitto, which knows a
device only by its certificate's common name, `fleet serve --broker`
requires the CSR's common name to be the thing name.)"""

import subprocess

import pytest
from awsiot import V2ServiceException, iotidentity, iotshadow

from conftest import CLAIM, QOS, TIMEOUT, Cloud, Inbox, rr_options, subscribed


def make_csr(directory, name: str):
    """A new EC key and a CSR naming `name`: (key path, CSR path)."""
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                    "-subj", f"/CN={name}", "-out", str(csr)],
                   check=True, capture_output=True)
    return key, csr


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """The embedded broker only: with MQTT 3.1.1 there is no response topic,
    and Mosquitto would send every device's reply to every device."""
    c = Cloud(tmp_path_factory.mktemp("cloud-provisioning"), "embedded")
    yield c
    c.stop()


def test_the_aws_sdk_provisions_a_device_by_claim(cloud, tmp_path):
    key, csr = make_csr(tmp_path, "serial-0042")
    claim = cloud.connect("aws-factory-1", cloud.dir / "claims" / f"{CLAIM}.pem",
                          cloud.dir / "claims" / f"{CLAIM}.key")
    try:
        identity = iotidentity.IotIdentityClient(claim)
        created, create_refused, registered, register_refused = Inbox(), Inbox(), Inbox(), Inbox()
        subscribed(identity.subscribe_to_create_certificate_from_csr_accepted(
            iotidentity.CreateCertificateFromCsrSubscriptionRequest(), QOS, created))
        subscribed(identity.subscribe_to_create_certificate_from_csr_rejected(
            iotidentity.CreateCertificateFromCsrSubscriptionRequest(), QOS, create_refused))
        subscribed(identity.subscribe_to_register_thing_accepted(
            iotidentity.RegisterThingSubscriptionRequest(template_name="default"), QOS,
            registered))
        subscribed(identity.subscribe_to_register_thing_rejected(
            iotidentity.RegisterThingSubscriptionRequest(template_name="default"), QOS,
            register_refused))

        # A CSR that is not one is refused, with AWS's error shape.
        identity.publish_create_certificate_from_csr(iotidentity.CreateCertificateFromCsrRequest(
            certificate_signing_request="not a CSR"), QOS).result(15)
        e = create_refused.take()
        assert e.status_code == 400 and e.error_code and e.error_message

        identity.publish_create_certificate_from_csr(iotidentity.CreateCertificateFromCsrRequest(
            certificate_signing_request=csr.read_text()), QOS).result(15)
        c = created.take()
        assert "BEGIN CERTIFICATE" in c.certificate_pem
        assert c.certificate_id and c.certificate_ownership_token

        # A forged ownership token is refused; the real one registers.
        identity.publish_register_thing(iotidentity.RegisterThingRequest(
            template_name="default", certificate_ownership_token="forged",
            parameters={"SerialNumber": "aws-0042"}), QOS).result(15)
        e = register_refused.take()
        assert e.status_code in (400, 401, 403) and e.error_message
        identity.publish_register_thing(iotidentity.RegisterThingRequest(
            template_name="default", certificate_ownership_token=c.certificate_ownership_token,
            parameters={"SerialNumber": "aws-0042"}), QOS).result(15)
        r = registered.take()
        thing = r.thing_name
        assert thing == "thing-aws-0042"
    finally:
        claim.disconnect().result(15)

    # The new identity works: the device connects as its thing (not as its
    # certificate's subject) and reports.
    cert = tmp_path / "device.pem"
    cert.write_text(c.certificate_pem)
    with pytest.raises(Exception):
        cloud.connect("serial-0042", cert, key)
    device = cloud.connect(thing, cert, key)
    try:
        shadow = iotshadow.IotShadowClient(device)
        accepted = Inbox()
        subscribed(shadow.subscribe_to_update_shadow_accepted(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), QOS, accepted))
        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=thing, client_token="hello",
            state=iotshadow.ShadowState(reported={"provisioned": True})), QOS).result(15)
        assert accepted.take(lambda r: r.client_token == "hello").version == 1
    finally:
        device.disconnect().result(15)
    things = cloud.cli("thing", "list")
    assert thing in str(things), things


def test_the_v2_identity_client_on_mqtt5_provisions_a_device(cloud, tmp_path):
    """AWS's `IotIdentityClientV2` on an MQTT 5 client (no response topic:
    the embedded broker routes the replies to the requester)."""
    key, csr = make_csr(tmp_path, "thing-aws-0043")
    claims = cloud.dir / "claims"
    with cloud.mqtt5("aws-factory-2", claims / f"{CLAIM}.pem", claims / f"{CLAIM}.key") as claim:
        identity = iotidentity.IotIdentityClientV2(claim, rr_options())
        c = identity.create_certificate_from_csr(iotidentity.CreateCertificateFromCsrRequest(
            certificate_signing_request=csr.read_text())).result(TIMEOUT)
        assert "BEGIN CERTIFICATE" in c.certificate_pem
        with pytest.raises(V2ServiceException) as refused:
            identity.register_thing(iotidentity.RegisterThingRequest(
                template_name="nope", certificate_ownership_token=c.certificate_ownership_token,
                parameters={"SerialNumber": "aws-0043"})).result(TIMEOUT)
        assert refused.value.modeled_error.status_code in (400, 404)
        r = identity.register_thing(iotidentity.RegisterThingRequest(
            template_name="default", certificate_ownership_token=c.certificate_ownership_token,
            parameters={"SerialNumber": "aws-0043"})).result(TIMEOUT)
        assert r.thing_name == "thing-aws-0043"
    cert = tmp_path / "thing-aws-0043.pem"
    cert.write_text(c.certificate_pem)
    cloud.connect("thing-aws-0043", cert, key).disconnect().result(TIMEOUT)
