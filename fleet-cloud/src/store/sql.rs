//! SQL text both SQL backends run unchanged.

/// The ids of revoked certificates.
pub(super) const REVOKED_CERTIFICATES: &str =
    "SELECT id FROM certificates WHERE status = 'REVOKED' ORDER BY id";

/// Things that are disabled, or have certificates and none active.
pub(super) const DENIED_IDENTITIES: &str = "SELECT name FROM things t WHERE NOT enabled OR (
    EXISTS (SELECT 1 FROM certificates c WHERE c.thing = t.name)
    AND NOT EXISTS (SELECT 1 FROM certificates c WHERE c.thing = t.name AND c.status = 'ACTIVE'))
 ORDER BY name";
