//! `fleet serve`'s configuration, from three layers: a TOML file
//! (`--config`), environment variables (`FLEET_SERVE_<KEY>`, for secrets
//! such as a database URL), and flags; each overrides the one before.
//! A key the file does not know, or a value that does not parse, is refused
//! with the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_cloud::store::StoreLocation;
use serde::{Deserialize, Serialize};

/// The keys, as they are written in the file (`client-id`); the
/// environment variable of each is `FLEET_SERVE_` and the key in capitals
/// with `_` for `-` (`FLEET_SERVE_CLIENT_ID`).
const KEYS: &[&str] = &[
    "broker",
    "listen",
    "dir",
    "cert",
    "key",
    "ca",
    "ca-key",
    "store",
    "claims",
    "client-id",
    "share-group",
    "prefix",
    "api",
    "no-api",
    "telemetry-file",
    "mosquitto-acl",
    "broker-pid-file",
    "max-retained-messages",
    "max-retained-message-bytes",
    "mosquitto-roster",
    "metrics",
    "start-timeout",
    "index-shadow-fields",
    "seen-interval-ms",
];

/// One layer: what it sets.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct Layer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The key of the CA that signs devices' certificates: a PEM file, or
    /// a `pkcs11:` URI of a key in an HSM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_api: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub telemetry_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mosquitto_acl: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_pid_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mosquitto_roster: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retained_messages: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retained_message_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<u64>,
    /// Shadow fields the fleet index keeps (`shadow.reported.*`); absent:
    /// every one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_shadow_fields: Option<Vec<String>>,
    /// How often a connected device's activity is recorded (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_interval_ms: Option<u64>,
    /// Provisioning templates (`[[template]]` tables); they replace the
    /// built-in `default` template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<Vec<TemplateConfig>>,
}

/// A `[[template]]` table: an AWS IoT fleet provisioning template document
/// and its pre-provisioning hook.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct TemplateConfig {
    /// Its name, as devices give it in `RegisterThing`'s topic.
    pub name: String,
    /// The template document (JSON, AWS's shape).
    pub file: PathBuf,
    /// Whether a claimant may provision onto an existing thing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_replace: bool,
    /// The pre-provisioning hook: an HTTPS URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_url: Option<String>,
    /// The CA of the hook's certificate (default: the Web PKI's roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_ca: Option<PathBuf>,
    /// Seconds the hook may take (default 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_timeout: Option<u64>,
}

impl TemplateConfig {
    /// The template it describes, its files read and checked.
    pub(crate) fn load(&self) -> Result<fleet_cloud::ProvisioningTemplate, String> {
        let at = format!("template {:?}", self.name);
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| format!("{at}: cannot read {}: {e}", self.file.display()))?;
        let document: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{at}: {}: not JSON: {e}", self.file.display()))?;
        let mut t = fleet_cloud::ProvisioningTemplate::from_document(&self.name, &document)
            .map_err(|e| format!("{at}: {}: {e}", self.file.display()))?;
        t.allow_replace = self.allow_replace;
        if let Some(url) = &self.hook_url {
            if !url.starts_with("https://") {
                return Err(format!("{at}: hook-url must be https://"));
            }
            let ca_pem = self
                .hook_ca
                .as_ref()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .map_err(|e| format!("{at}: cannot read {}: {e}", p.display()))
                })
                .transpose()?;
            t.webhook = Some(fleet_cloud::Webhook {
                url: url.clone(),
                ca_pem,
                timeout: std::time::Duration::from_secs(self.hook_timeout.unwrap_or(5)),
            });
        } else if self.hook_ca.is_some() || self.hook_timeout.is_some() {
            return Err(format!("{at}: hook-ca and hook-timeout need hook-url"));
        }
        Ok(t)
    }
}

impl Layer {
    /// Reads a TOML file.
    pub(crate) fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads `FLEET_SERVE_*` from `env` (a lookup, so tests need not touch
    /// the process's environment): lists are comma-separated, `no-api` is
    /// `true` or `false`.
    pub(crate) fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut table = toml::Table::new();
        for key in KEYS {
            let var = format!("FLEET_SERVE_{}", key.to_uppercase().replace('-', "_"));
            let Some(value) = env(&var) else { continue };
            let value = match *key {
                "claims" | "index-shadow-fields" => toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.into()))
                        .collect(),
                ),
                "no-api" => toml::Value::Boolean(
                    value
                        .parse()
                        .map_err(|_| format!("{var}: {value:?} is not true or false"))?,
                ),
                "max-retained-messages"
                | "max-retained-message-bytes"
                | "start-timeout"
                | "seen-interval-ms" => toml::Value::Integer(
                    value
                        .parse::<u32>()
                        .map(i64::from)
                        .map_err(|_| format!("{var}: {value:?} is not a non-negative integer"))?,
                ),
                _ => toml::Value::String(value),
            };
            table.insert((*key).to_string(), value);
        }
        table
            .try_into()
            .map_err(|e| format!("environment (FLEET_SERVE_*): {e}"))
    }

    /// `self` with whatever `over` sets put over it.
    pub(crate) fn under(self, over: Self) -> Self {
        Self {
            broker: over.broker.or(self.broker),
            listen: over.listen.or(self.listen),
            dir: over.dir.or(self.dir),
            cert: over.cert.or(self.cert),
            key: over.key.or(self.key),
            ca: over.ca.or(self.ca),
            ca_key: over.ca_key.or(self.ca_key),
            store: over.store.or(self.store),
            claims: over.claims.or(self.claims),
            client_id: over.client_id.or(self.client_id),
            share_group: over.share_group.or(self.share_group),
            prefix: over.prefix.or(self.prefix),
            api: over.api.or(self.api),
            no_api: over.no_api.or(self.no_api),
            telemetry_file: over.telemetry_file.or(self.telemetry_file),
            mosquitto_acl: over.mosquitto_acl.or(self.mosquitto_acl),
            broker_pid_file: over.broker_pid_file.or(self.broker_pid_file),
            mosquitto_roster: over.mosquitto_roster.or(self.mosquitto_roster),
            max_retained_messages: over.max_retained_messages.or(self.max_retained_messages),
            max_retained_message_bytes: over
                .max_retained_message_bytes
                .or(self.max_retained_message_bytes),
            metrics: over.metrics.or(self.metrics),
            start_timeout: over.start_timeout.or(self.start_timeout),
            index_shadow_fields: over.index_shadow_fields.or(self.index_shadow_fields),
            seen_interval_ms: over.seen_interval_ms.or(self.seen_interval_ms),
            template: over.template.or(self.template),
        }
    }

    /// The effective configuration: defaults for what no layer set, and
    /// the checks that span keys.
    pub(crate) fn resolve(self) -> Result<ServeConfig, String> {
        let store = self
            .store
            .as_deref()
            .map(str::parse::<StoreLocation>)
            .transpose()
            .map_err(|e| format!("store: {e}"))?;
        if self.mosquitto_acl.is_some() && self.broker.is_none() {
            return Err("mosquitto-acl: needs broker (it is the external broker's ACL)".into());
        }
        if self.mosquitto_roster.is_some() && self.broker.is_none() {
            return Err(
                "mosquitto-roster: needs broker (it is what the external broker's plugin admits by)"
                    .into(),
            );
        }
        if self.broker.is_some()
            && (self.max_retained_messages.is_some() || self.max_retained_message_bytes.is_some())
        {
            return Err(
                "max-retained-messages, max-retained-message-bytes: the embedded broker's limits; \
                 an external broker keeps its own (Mosquitto: retain_available, message_size_limit)"
                    .into(),
            );
        }
        if self.broker_pid_file.is_some() && self.mosquitto_acl.is_none() {
            return Err("broker-pid-file: needs mosquitto-acl".into());
        }
        for f in self.index_shadow_fields.iter().flatten() {
            let field = f.strip_suffix('*').unwrap_or(f);
            if !field.starts_with("shadow.") {
                return Err(format!(
                    "index-shadow-fields: {f:?} is not a shadow field (shadow.reported.*, shadow.name.cfg.*)"
                ));
            }
        }
        if let Some(key) = &self.ca_key
            && fleet_pkcs11::Pkcs11Uri::is_pkcs11(key)
        {
            key.parse::<fleet_pkcs11::Pkcs11Uri>()
                .map_err(|e| format!("ca-key: {e}"))?;
        }
        if self.seen_interval_ms == Some(0) {
            return Err("seen-interval-ms: must be at least 1".into());
        }
        let templates = self.template.unwrap_or_default();
        // Read and checked now: a template that does not hold is a usage
        // error, with its file and the path of the fault.
        let mut names = std::collections::BTreeSet::new();
        for t in &templates {
            if !names.insert(t.name.clone()) {
                return Err(format!("template {:?}: defined twice", t.name));
            }
            t.load()?;
        }
        if let Some(b) = &self.broker
            && b.rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(format!("broker: {b:?} is not host:port"));
        }
        Ok(ServeConfig {
            broker: self.broker,
            listen: self.listen.unwrap_or(([127, 0, 0, 1], 8883).into()),
            dir: self.dir.unwrap_or_else(|| "fleet-data".into()),
            cert: self.cert,
            key: self.key,
            ca: self.ca,
            ca_key: self.ca_key,
            store,
            claims: self.claims.unwrap_or_default(),
            client_id: self.client_id.unwrap_or_else(|| "fleet-cloud".into()),
            share_group: self.share_group,
            prefix: self.prefix.unwrap_or_else(|| "$aws".into()),
            api: self.api.unwrap_or(([127, 0, 0, 1], 8443).into()),
            no_api: self.no_api.unwrap_or(false),
            telemetry_file: self.telemetry_file,
            mosquitto_acl: self.mosquitto_acl,
            broker_pid_file: self.broker_pid_file,
            mosquitto_roster: self.mosquitto_roster,
            max_retained_messages: self.max_retained_messages,
            max_retained_message_bytes: self.max_retained_message_bytes,
            metrics: self.metrics,
            start_timeout: std::time::Duration::from_secs(self.start_timeout.unwrap_or(30)),
            index_shadow_fields: self.index_shadow_fields,
            seen_interval: std::time::Duration::from_millis(
                self.seen_interval_ms.unwrap_or(10_000),
            ),
            templates,
        })
    }
}

/// What `fleet serve` runs with.
#[derive(Debug, Clone)]
pub(crate) struct ServeConfig {
    pub broker: Option<String>,
    pub listen: SocketAddr,
    pub dir: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub ca_key: Option<String>,
    pub store: Option<StoreLocation>,
    pub claims: Vec<String>,
    pub client_id: String,
    pub share_group: Option<String>,
    pub prefix: String,
    pub api: SocketAddr,
    pub no_api: bool,
    pub telemetry_file: Option<PathBuf>,
    pub mosquitto_acl: Option<PathBuf>,
    pub broker_pid_file: Option<PathBuf>,
    pub mosquitto_roster: Option<PathBuf>,
    /// The embedded broker's retained messages at most (AWS IoT: a quota
    /// per account); default [`ClientLimits`](fleet_cloud::ClientLimits)'.
    pub max_retained_messages: Option<usize>,
    /// Bytes of one retained message at most (topic and payload).
    pub max_retained_message_bytes: Option<usize>,
    /// Where Prometheus scrapes `/metrics` (`None`: not served).
    pub metrics: Option<SocketAddr>,
    /// How long an external broker may take to answer at start.
    pub start_timeout: std::time::Duration,
    /// Shadow fields the fleet index keeps (`None`: every one).
    pub index_shadow_fields: Option<Vec<String>>,
    /// How often a connected device's activity is recorded.
    pub seen_interval: std::time::Duration,
    /// Provisioning templates (none: the built-in `default`).
    pub templates: Vec<TemplateConfig>,
}

impl ServeConfig {
    /// The configuration as a TOML file would give it, with the store's
    /// password masked (`--print-config`).
    pub(crate) fn to_toml(&self) -> String {
        let layer = Layer {
            broker: self.broker.clone(),
            listen: Some(self.listen),
            dir: Some(self.dir.clone()),
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            ca_key: self.ca_key.clone(),
            store: Some(self.store.as_ref().map_or_else(
                || format!("sqlite:{}", self.dir.join("fleet.db").display()),
                ToString::to_string,
            )),
            claims: Some(self.claims.clone()),
            client_id: Some(self.client_id.clone()),
            share_group: self.share_group.clone(),
            prefix: Some(self.prefix.clone()),
            api: Some(self.api),
            no_api: Some(self.no_api),
            telemetry_file: self.telemetry_file.clone(),
            mosquitto_acl: self.mosquitto_acl.clone(),
            broker_pid_file: self.broker_pid_file.clone(),
            mosquitto_roster: self.mosquitto_roster.clone(),
            max_retained_messages: self.max_retained_messages,
            max_retained_message_bytes: self.max_retained_message_bytes,
            metrics: self.metrics,
            start_timeout: Some(self.start_timeout.as_secs()),
            index_shadow_fields: self.index_shadow_fields.clone(),
            seen_interval_ms: Some(
                u64::try_from(self.seen_interval.as_millis()).unwrap_or(u64::MAX),
            ),
            template: (!self.templates.is_empty()).then(|| self.templates.clone()),
        };
        toml::to_string(&layer).unwrap_or_else(|e| format!("# cannot show: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order_and_bad_keys_are_named() {
        let file: Layer = toml::from_str(
            "store = \"sqlite:a.db\"\nclient-id = \"from-file\"\nprefix = \"fleet\"\n",
        )
        .unwrap();
        let env = Layer::from_env(|v| match v {
            "FLEET_SERVE_STORE" => Some("postgres://fleet:secret@db/fleet".into()),
            "FLEET_SERVE_CLAIMS" => Some("a@f, b@f".into()),
            "FLEET_SERVE_CLIENT_ID" => Some("from-env".into()),
            _ => None,
        })
        .unwrap();
        let flags = Layer {
            client_id: Some("from-flag".into()),
            ..Layer::default()
        };
        let c = file.under(env).under(flags).resolve().unwrap();
        assert_eq!(c.client_id, "from-flag");
        assert_eq!(c.prefix, "fleet");
        assert_eq!(c.claims, ["a@f", "b@f"]);
        assert!(matches!(c.store, Some(StoreLocation::Postgres(_))));
        let shown = c.to_toml();
        assert!(shown.contains("postgres://fleet:***@db/fleet"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
        // What it shows reads back as the same configuration.
        let again: Layer = toml::from_str(&shown).unwrap();
        assert_eq!(again.resolve().unwrap().client_id, "from-flag");

        // The CA key: a file or a PKCS#11 URI, from the file or the
        // environment; a URI with the PIN in it is refused with its place.
        let file: Layer = toml::from_str(
            "ca-key = \"pkcs11:token=fleet;object=ca?module-path=/m.so&pin-source=env:HSM_PIN\"\n",
        )
        .unwrap();
        assert!(
            file.clone()
                .resolve()
                .unwrap()
                .ca_key
                .unwrap()
                .starts_with("pkcs11:")
        );
        let env =
            Layer::from_env(|v| (v == "FLEET_SERVE_CA_KEY").then(|| "/etc/fleet/ca.key".into()))
                .unwrap();
        let c = file.under(env).resolve().unwrap();
        assert_eq!(c.ca_key.as_deref(), Some("/etc/fleet/ca.key"));
        let e = toml::from_str::<Layer>("ca-key = \"pkcs11:token=fleet?pin-value=1234\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.starts_with("ca-key: pkcs11 URI, at byte 19"), "{e}");

        let e = toml::from_str::<Layer>("lisen = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = toml::from_str::<Layer>("listen = \"not an address\"\n").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e =
            Layer::from_env(|v| (v == "FLEET_SERVE_API").then(|| "nowhere".into())).unwrap_err();
        assert!(e.contains("api"), "{e}");
        let e = Layer::from_env(|v| (v == "FLEET_SERVE_NO_API").then(|| "yes".into())).unwrap_err();
        assert!(e.contains("FLEET_SERVE_NO_API"), "{e}");
        let env = Layer::from_env(|v| {
            (v == "FLEET_SERVE_MAX_RETAINED_MESSAGES").then(|| "500000".into())
        })
        .unwrap();
        assert_eq!(env.resolve().unwrap().max_retained_messages, Some(500_000));
        let e = Layer::from_env(|v| {
            (v == "FLEET_SERVE_MAX_RETAINED_MESSAGE_BYTES").then(|| "-1".into())
        })
        .unwrap_err();
        assert!(e.contains("FLEET_SERVE_MAX_RETAINED_MESSAGE_BYTES"), "{e}");
        let external = Layer {
            broker: Some("localhost:8883".into()),
            max_retained_messages: Some(10),
            ..Layer::default()
        };
        assert!(
            external
                .resolve()
                .unwrap_err()
                .starts_with("max-retained-messages")
        );
        let bad_store = Layer {
            store: Some("mysql://db".into()),
            ..Layer::default()
        };
        assert!(bad_store.resolve().unwrap_err().starts_with("store:"));
        let acl_alone = Layer {
            mosquitto_acl: Some("acl".into()),
            ..Layer::default()
        };
        assert!(
            acl_alone
                .resolve()
                .unwrap_err()
                .starts_with("mosquitto-acl:")
        );
    }
}
