//! Every MQTT topic of the protocol, built and parsed without allocating.
//!
//! The layout is that of the AWS IoT device MQTT API, under a configurable
//! prefix ([`TopicPrefix::AWS`], `$aws`, by default):
//!
//! | family | topics (after the prefix) |
//! |---|---|
//! | shadows | `things/{thing}/shadow[/name/{shadow}]/{get,update,delete}[/accepted,/rejected]`, `.../update/delta`, `.../update/documents` |
//! | jobs | `things/{thing}/jobs/{notify,notify-next}`, `.../jobs/{get,start-next}[/accepted,/rejected]`, `.../jobs/{jobId}/{get,update}[/accepted,/rejected]` |
//! | file streams | `things/{thing}/streams/{streamId}/{describe,get}/{json,cbor}`, `.../{description,data,rejected}/{json,cbor}` |
//! | provisioning | `certificates/create/{json,cbor}`, `certificates/create-from-csr/{json,cbor}`, `provisioning-templates/{template}/provision/{json,cbor}`, each `[/accepted,/rejected]` |
//! | commands | `commands/things/{thing}/executions/{executionId}/request/{json,cbor}`, `.../response[/accepted,/rejected]/{json,cbor}` |
//!
//! A [`Topic`] is a value; [`Topic::parse`] turns a topic string into one
//! (borrowing the names from the string) and [`Topic::display`],
//! [`Topic::write_to`] or [`Topic::len`] turn it back.
//!
//! ```
//! use fleet_core::topic::{Role, ShadowOp, ShadowTopic, ShadowTopicKind, Topic, TopicPrefix};
//! use fleet_core::{ShadowName, ThingName};
//!
//! let prefix = TopicPrefix::AWS;
//! let topic = Topic::Shadow(ShadowTopic {
//!     thing: ThingName::new("pump-7")?,
//!     shadow: Some(ShadowName::new("config")?),
//!     kind: ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted),
//! });
//!
//! let mut buf = [0u8; 128];
//! let text = topic.write_to(&prefix, &mut buf)?;
//! assert_eq!(text, "$aws/things/pump-7/shadow/name/config/update/accepted");
//! assert_eq!(Topic::parse(&prefix, text)?, topic);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;

use crate::identity::{
    ClientName, JobId, NameError, ShadowName, StreamId, TemplateName, ThingName,
};

/// Why a topic could not be parsed or built.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// The topic does not start with the configured prefix.
    WrongPrefix,
    /// The topic is under the prefix but is not a topic of the protocol.
    Unknown,
    /// A name in the topic (thing, shadow, job, stream, template) is invalid.
    InvalidName(NameError),
    /// A prefix must be one or more non-empty levels without wildcards.
    InvalidPrefix,
    /// The output buffer is too small; `needed` bytes are required.
    BufferTooSmall {
        /// Length of the whole topic in bytes.
        needed: usize,
    },
}

impl From<NameError> for TopicError {
    fn from(e: NameError) -> Self {
        Self::InvalidName(e)
    }
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongPrefix => f.write_str("topic does not start with the configured prefix"),
            Self::Unknown => f.write_str("not a topic of the fleet protocol"),
            Self::InvalidName(e) => write!(f, "invalid name in topic: {e}"),
            Self::InvalidPrefix => f.write_str(
                "topic prefix must be non-empty levels separated by '/', without '+', '#' or NUL",
            ),
            Self::BufferTooSmall { needed } => {
                write!(f, "buffer too small for topic ({needed} bytes needed)")
            }
        }
    }
}

impl core::error::Error for TopicError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::InvalidName(e) => Some(e),
            _ => None,
        }
    }
}

/// The first level(s) of every topic: `$aws` for AWS IoT and by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicPrefix<'a>(&'a str);

impl<'a> TopicPrefix<'a> {
    /// `$aws`, the prefix of AWS IoT Core and the default of fleet.
    pub const AWS: TopicPrefix<'static> = TopicPrefix("$aws");

    /// Checks a custom prefix such as `fleet` or `acme/v1`: one or more
    /// non-empty levels, no wildcards, no NUL, no leading or trailing `/`.
    pub fn new(prefix: &'a str) -> Result<Self, TopicError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 256
            && prefix.split('/').all(|level| !level.is_empty())
            && !prefix.contains(['+', '#', '\0']);
        if valid {
            Ok(Self(prefix))
        } else {
            Err(TopicError::InvalidPrefix)
        }
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

impl Default for TopicPrefix<'static> {
    fn default() -> Self {
        Self::AWS
    }
}

/// The role of a message in a request/reply exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The request, sent by the device (or the backend acting for it).
    Request,
    /// The reply to an accepted request (`/accepted`).
    Accepted,
    /// The reply to a rejected request (`/rejected`).
    Rejected,
}

impl Role {
    fn suffix(self) -> Option<&'static str> {
        match self {
            Self::Request => None,
            Self::Accepted => Some("accepted"),
            Self::Rejected => Some("rejected"),
        }
    }

    fn from_suffix(s: Option<&str>) -> Option<Self> {
        match s {
            None => Some(Self::Request),
            Some("accepted") => Some(Self::Accepted),
            Some("rejected") => Some(Self::Rejected),
            Some(_) => None,
        }
    }
}

/// Payload encoding of file-stream and provisioning topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `json`
    Json,
    /// `cbor`
    Cbor,
}

impl Format {
    /// The topic level: `json` or `cbor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Cbor => "cbor",
        }
    }

    /// From a topic level: `json` or `cbor`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "cbor" => Some(Self::Cbor),
            _ => None,
        }
    }
}

/// A shadow operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShadowOp {
    /// `get`
    Get,
    /// `update`
    Update,
    /// `delete`
    Delete,
}

impl ShadowOp {
    fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "get" => Some(Self::Get),
            "update" => Some(Self::Update),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// Which shadow topic, below `shadow[/name/{shadow}]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShadowTopicKind {
    /// A request or its reply: `get`, `update/accepted`, `delete/rejected`, ...
    Op(ShadowOp, Role),
    /// `update/delta`: the part of desired that differs from reported.
    Delta,
    /// `update/documents`: the previous and current documents after an update.
    Documents,
}

/// A device-shadow topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShadowTopic<'a> {
    /// The thing that owns the shadow.
    pub thing: ThingName<'a>,
    /// The named shadow, or `None` for the classic shadow.
    pub shadow: Option<ShadowName<'a>>,
    /// Which topic of the shadow.
    pub kind: ShadowTopicKind,
}

/// Which jobs topic, below `things/{thing}/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobsTopicKind<'a> {
    /// `notify`: the list of pending executions changed.
    Notify,
    /// `notify-next`: the next pending execution changed.
    NotifyNext,
    /// `get`: list pending executions.
    GetPending(Role),
    /// `start-next`: start the next pending execution.
    StartNext(Role),
    /// `{jobId}/get`: describe one execution.
    Describe(JobId<'a>, Role),
    /// `$next/get`: describe the next pending execution (the AWS OTA
    /// library asks for its job document this way).
    DescribeNext(Role),
    /// `{jobId}/update`: update one execution's status.
    Update(JobId<'a>, Role),
}

/// A jobs topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobsTopic<'a> {
    /// The thing the executions belong to.
    pub thing: ThingName<'a>,
    /// Which topic.
    pub kind: JobsTopicKind<'a>,
}

/// Which file-stream topic, below `things/{thing}/streams/{streamId}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamTopicKind {
    /// `describe`: the device asks for the stream's description.
    Describe,
    /// `get`: the device asks for blocks of a file.
    Get,
    /// `description`: the description, sent to the device.
    Description,
    /// `data`: a block of a file, sent to the device.
    Data,
    /// `rejected`: a describe or get was rejected.
    Rejected,
}

impl StreamTopicKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Describe => "describe",
            Self::Get => "get",
            Self::Description => "description",
            Self::Data => "data",
            Self::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "describe" => Some(Self::Describe),
            "get" => Some(Self::Get),
            "description" => Some(Self::Description),
            "data" => Some(Self::Data),
            "rejected" => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// An MQTT file-stream topic (OTA downloads over MQTT).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamTopic<'a> {
    /// The thing that reads the stream.
    pub thing: ThingName<'a>,
    /// The stream.
    pub stream: StreamId<'a>,
    /// Which topic.
    pub kind: StreamTopicKind,
    /// Payload encoding.
    pub format: Format,
}

/// A fleet-provisioning topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProvisioningTopic<'a> {
    /// `certificates/create/{format}`: the cloud makes a key and certificate.
    CreateKeysAndCertificate(Format, Role),
    /// `certificates/create-from-csr/{format}`: the cloud signs the device's CSR.
    CreateCertificateFromCsr(Format, Role),
    /// `provisioning-templates/{template}/provision/{format}`: register a thing.
    RegisterThing(TemplateName<'a>, Format, Role),
}

/// A provisioning request (or its reply) made through a broker that cannot
/// send a reply to one connection only (Mosquitto, with MQTT 3.1.1, which
/// has no response topic): below `claims/{identity}/{client}/`, where
/// `identity` is the claim identity (the broker's user name, Mosquitto's
/// `%u`) and `client` the client id (`%c`). The broker's policy lets a
/// connection write such requests, and read their replies, only under its
/// own two names, so no other claimant sees them; the service answers only
/// a configured claim identity.
///
/// `claims/{identity}/{client}/certificates/create-from-csr/{format}[/role]`,
/// `.../certificates/create/{format}[/role]` and
/// `.../provisioning-templates/{template}/{format}[/role]` (AWS's topics
/// with `provision` left out, to stay within AWS's seven slashes).
///
/// ```
/// use fleet_core::topic::{Role, Topic, TopicPrefix};
/// let p = TopicPrefix::AWS;
/// let t = Topic::parse(&p, "$aws/claims/claim@factory/c-17/certificates/create-from-csr/json")?;
/// assert!(t.is_from_device());
/// let reply = t.reply(Role::Accepted).unwrap();
/// assert_eq!(
///     reply.display(&p).to_string(),
///     "$aws/claims/claim@factory/c-17/certificates/create-from-csr/json/accepted"
/// );
/// # Ok::<(), fleet_core::TopicError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimTopic<'a> {
    /// The claim identity (the certificate's common name).
    pub identity: ClientName<'a>,
    /// The connection's client id.
    pub client: ClientName<'a>,
    /// The request or its reply.
    pub request: ProvisioningTopic<'a>,
}

/// Which command topic, below `commands/things/{thing}/executions/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandTopicKind {
    /// `request/{format}`: the command, sent to the device.
    Request,
    /// `response/{format}` (the device's answer, [`Role::Request`]) and
    /// `response/{accepted,rejected}/{format}` (what the cloud made of it).
    Response(Role),
}

/// An AWS IoT commands topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommandTopic<'a> {
    /// The thing the command is for.
    pub thing: ThingName<'a>,
    /// The command execution (ids follow the job-id rule).
    pub execution: JobId<'a>,
    /// Which topic.
    pub kind: CommandTopicKind,
    /// Payload encoding.
    pub format: Format,
}

/// Any topic of the protocol.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic<'a> {
    /// A device-shadow topic.
    Shadow(ShadowTopic<'a>),
    /// A jobs topic.
    Jobs(JobsTopic<'a>),
    /// A file-stream topic.
    Stream(StreamTopic<'a>),
    /// A fleet-provisioning topic.
    Provisioning(ProvisioningTopic<'a>),
    /// A commands topic.
    Command(CommandTopic<'a>),
    /// A fleet-provisioning topic in a claimant's own namespace.
    Claim(ClaimTopic<'a>),
    /// `things/{thing}/presence`: where a device agent keeps its retained
    /// birth message and its last will, so that a backend behind a broker
    /// that reports no lifecycle events learns who is connected
    /// ([`crate::presence`]).
    Presence(ThingName<'a>),
}

/// The most levels any topic has after the prefix
/// (`commands/things/{t}/executions/{id}/response/accepted/json`).
const MAX_LEVELS: usize = 8;

impl<'a> Topic<'a> {
    /// Parses `topic`, which must start with `prefix`. Names are borrowed
    /// from `topic` and validated.
    pub fn parse(prefix: &TopicPrefix<'_>, topic: &'a str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::WrongPrefix)?;

        let mut levels = [""; MAX_LEVELS];
        let mut n = 0;
        for level in rest.split('/') {
            if n == MAX_LEVELS {
                return Err(TopicError::Unknown);
            }
            levels[n] = level;
            n += 1;
        }
        let levels = &levels[..n];

        match levels {
            ["things", thing, "shadow", rest @ ..] => parse_shadow(thing, rest),
            ["things", thing, "presence"] => Ok(Topic::Presence(ThingName::new(thing)?)),
            ["things", thing, "jobs", rest @ ..] => parse_jobs(thing, rest),
            ["things", thing, "streams", stream, kind, format] => {
                let kind = StreamTopicKind::parse(kind).ok_or(TopicError::Unknown)?;
                let format = Format::parse(format).ok_or(TopicError::Unknown)?;
                Ok(Topic::Stream(StreamTopic {
                    thing: ThingName::new(thing)?,
                    stream: StreamId::new(stream)?,
                    kind,
                    format,
                }))
            }
            ["commands", "things", thing, "executions", id, rest @ ..] => {
                let (kind, format) = match rest {
                    ["request", f] => (CommandTopicKind::Request, f),
                    ["response", f] => (CommandTopicKind::Response(Role::Request), f),
                    ["response", "accepted", f] => (CommandTopicKind::Response(Role::Accepted), f),
                    ["response", "rejected", f] => (CommandTopicKind::Response(Role::Rejected), f),
                    _ => return Err(TopicError::Unknown),
                };
                Ok(Topic::Command(CommandTopic {
                    thing: ThingName::new(thing)?,
                    execution: JobId::new(id)?,
                    kind,
                    format: Format::parse(format).ok_or(TopicError::Unknown)?,
                }))
            }
            ["claims", identity, client, rest @ ..] => Ok(Topic::Claim(ClaimTopic {
                identity: ClientName::new(identity)?,
                client: ClientName::new(client)?,
                request: parse_provisioning(rest, false)?,
            })),
            rest => parse_provisioning(rest, true).map(Topic::Provisioning),
        }
    }

    /// Calls `out` with each piece of the topic text in order. Every way of
    /// building a topic goes through here, so they cannot disagree.
    fn for_each_piece<E>(
        &self,
        prefix: &TopicPrefix<'_>,
        mut out: impl FnMut(&str) -> Result<(), E>,
    ) -> Result<(), E> {
        out(prefix.as_str())?;
        let mut level = |s: &str| -> Result<(), E> {
            out("/")?;
            out(s)
        };
        match self {
            Topic::Shadow(t) => {
                level("things")?;
                level(t.thing.as_str())?;
                level("shadow")?;
                if let Some(name) = &t.shadow {
                    level("name")?;
                    level(name.as_str())?;
                }
                match t.kind {
                    ShadowTopicKind::Op(op, role) => {
                        level(op.as_str())?;
                        if let Some(s) = role.suffix() {
                            level(s)?;
                        }
                    }
                    ShadowTopicKind::Delta => {
                        level("update")?;
                        level("delta")?;
                    }
                    ShadowTopicKind::Documents => {
                        level("update")?;
                        level("documents")?;
                    }
                }
            }
            Topic::Jobs(t) => {
                level("things")?;
                level(t.thing.as_str())?;
                level("jobs")?;
                let (middle, op, role) = match &t.kind {
                    JobsTopicKind::Notify => (None, "notify", Role::Request),
                    JobsTopicKind::NotifyNext => (None, "notify-next", Role::Request),
                    JobsTopicKind::GetPending(r) => (None, "get", *r),
                    JobsTopicKind::StartNext(r) => (None, "start-next", *r),
                    JobsTopicKind::Describe(id, r) => (Some(id.as_str()), "get", *r),
                    JobsTopicKind::DescribeNext(r) => (Some("$next"), "get", *r),
                    JobsTopicKind::Update(id, r) => (Some(id.as_str()), "update", *r),
                };
                if let Some(id) = middle {
                    level(id)?;
                }
                level(op)?;
                if let Some(s) = role.suffix() {
                    level(s)?;
                }
            }
            Topic::Stream(t) => {
                level("things")?;
                level(t.thing.as_str())?;
                level("streams")?;
                level(t.stream.as_str())?;
                level(t.kind.as_str())?;
                level(t.format.as_str())?;
            }
            Topic::Provisioning(p) => provisioning_pieces(p, true, &mut level)?,
            Topic::Claim(c) => {
                level("claims")?;
                level(c.identity.as_str())?;
                level(c.client.as_str())?;
                provisioning_pieces(&c.request, false, &mut level)?;
            }
            Topic::Presence(thing) => {
                level("things")?;
                level(thing.as_str())?;
                level("presence")?;
            }
            Topic::Command(c) => {
                level("commands")?;
                level("things")?;
                level(c.thing.as_str())?;
                level("executions")?;
                level(c.execution.as_str())?;
                match c.kind {
                    CommandTopicKind::Request => level("request")?,
                    CommandTopicKind::Response(role) => {
                        level("response")?;
                        if let Some(s) = role.suffix() {
                            level(s)?;
                        }
                    }
                }
                level(c.format.as_str())?;
            }
        }
        Ok(())
    }

    /// Length of the topic text in bytes.
    #[allow(clippy::len_without_is_empty)] // a topic is never empty
    pub fn len(&self, prefix: &TopicPrefix<'_>) -> usize {
        let mut len = 0;
        let _ = self.for_each_piece(prefix, |s| -> Result<(), core::convert::Infallible> {
            len += s.len();
            Ok(())
        });
        len
    }

    /// Writes the topic into `buf` and returns it as text.
    pub fn write_to<'b>(
        &self,
        prefix: &TopicPrefix<'_>,
        buf: &'b mut [u8],
    ) -> Result<&'b str, TopicError> {
        let needed = self.len(prefix);
        if buf.len() < needed {
            return Err(TopicError::BufferTooSmall { needed });
        }
        let mut at = 0;
        let _ = self.for_each_piece(prefix, |s| -> Result<(), core::convert::Infallible> {
            buf[at..at + s.len()].copy_from_slice(s.as_bytes());
            at += s.len();
            Ok(())
        });
        // Only whole `&str` pieces were copied, so this is always UTF-8.
        core::str::from_utf8(&buf[..at]).map_err(|_| TopicError::Unknown)
    }

    /// A value that formats as the topic text (`to_string()` with `alloc`,
    /// or `write!` into any `core::fmt::Write`).
    pub fn display<'t>(&'t self, prefix: &'t TopicPrefix<'t>) -> TopicDisplay<'t> {
        TopicDisplay {
            topic: self,
            prefix,
        }
    }

    /// The thing this topic belongs to; `None` for provisioning topics,
    /// which a device uses before it has a thing name.
    pub fn thing(&self) -> Option<&ThingName<'a>> {
        match self {
            Topic::Shadow(t) => Some(&t.thing),
            Topic::Jobs(t) => Some(&t.thing),
            Topic::Stream(t) => Some(&t.thing),
            Topic::Command(t) => Some(&t.thing),
            Topic::Presence(thing) => Some(thing),
            Topic::Provisioning(_) | Topic::Claim(_) => None,
        }
    }

    /// The service this topic belongs to.
    pub fn service(&self) -> Service {
        match self {
            Topic::Shadow(_) => Service::Shadows,
            Topic::Jobs(_) => Service::Jobs,
            Topic::Stream(_) => Service::Streams,
            Topic::Provisioning(_) | Topic::Claim(_) => Service::Provisioning,
            Topic::Command(_) => Service::Commands,
            Topic::Presence(_) => Service::Presence,
        }
    }

    /// Whether a device sends this topic to the cloud (a request, or the
    /// answer to a command), rather than the cloud to a device.
    ///
    /// ```
    /// use fleet_core::topic::{Topic, TopicPrefix};
    /// let p = TopicPrefix::AWS;
    /// assert!(Topic::parse(&p, "$aws/things/t/shadow/update")?.is_from_device());
    /// assert!(!Topic::parse(&p, "$aws/things/t/shadow/update/delta")?.is_from_device());
    /// assert!(Topic::parse(&p, "$aws/commands/things/t/executions/e1/response/json")?.is_from_device());
    /// # Ok::<(), fleet_core::TopicError>(())
    /// ```
    pub fn is_from_device(&self) -> bool {
        match self {
            Topic::Shadow(t) => matches!(t.kind, ShadowTopicKind::Op(_, Role::Request)),
            Topic::Jobs(t) => matches!(
                t.kind,
                JobsTopicKind::GetPending(Role::Request)
                    | JobsTopicKind::StartNext(Role::Request)
                    | JobsTopicKind::Describe(_, Role::Request)
                    | JobsTopicKind::DescribeNext(Role::Request)
                    | JobsTopicKind::Update(_, Role::Request)
            ),
            Topic::Stream(t) => matches!(t.kind, StreamTopicKind::Describe | StreamTopicKind::Get),
            Topic::Provisioning(
                ProvisioningTopic::CreateKeysAndCertificate(_, r)
                | ProvisioningTopic::CreateCertificateFromCsr(_, r)
                | ProvisioningTopic::RegisterThing(_, _, r),
            )
            | Topic::Claim(ClaimTopic {
                request:
                    ProvisioningTopic::CreateKeysAndCertificate(_, r)
                    | ProvisioningTopic::CreateCertificateFromCsr(_, r)
                    | ProvisioningTopic::RegisterThing(_, _, r),
                ..
            }) => *r == Role::Request,
            Topic::Command(t) => t.kind == CommandTopicKind::Response(Role::Request),
            Topic::Presence(_) => true,
        }
    }

    /// The reply topic of a request with `role` (accepted or rejected):
    /// `update` → `update/accepted`, `get/json` → `get/rejected/json`...
    /// `None` for a topic that is not a request answered so (notifications,
    /// stream requests, whose answers are topics of their own).
    ///
    /// ```
    /// use fleet_core::topic::{Role, Topic, TopicPrefix};
    /// let p = TopicPrefix::AWS;
    /// let request = Topic::parse(&p, "$aws/provisioning-templates/f/provision/json")?;
    /// let reply = request.reply(Role::Rejected).unwrap();
    /// assert_eq!(reply.display(&p).to_string(), "$aws/provisioning-templates/f/provision/json/rejected");
    /// # Ok::<(), fleet_core::TopicError>(())
    /// ```
    pub fn reply(&self, role: Role) -> Option<Topic<'a>> {
        let mut reply = self.clone();
        let slot = match &mut reply {
            Topic::Shadow(ShadowTopic {
                kind: ShadowTopicKind::Op(_, r),
                ..
            }) => r,
            Topic::Jobs(t) => match &mut t.kind {
                JobsTopicKind::GetPending(r)
                | JobsTopicKind::StartNext(r)
                | JobsTopicKind::Describe(_, r)
                | JobsTopicKind::DescribeNext(r)
                | JobsTopicKind::Update(_, r) => r,
                JobsTopicKind::Notify | JobsTopicKind::NotifyNext => return None,
            },
            Topic::Provisioning(
                ProvisioningTopic::CreateKeysAndCertificate(_, r)
                | ProvisioningTopic::CreateCertificateFromCsr(_, r)
                | ProvisioningTopic::RegisterThing(_, _, r),
            )
            | Topic::Claim(ClaimTopic {
                request:
                    ProvisioningTopic::CreateKeysAndCertificate(_, r)
                    | ProvisioningTopic::CreateCertificateFromCsr(_, r)
                    | ProvisioningTopic::RegisterThing(_, _, r),
                ..
            }) => r,
            Topic::Command(CommandTopic {
                kind: CommandTopicKind::Response(r),
                ..
            }) => r,
            _ => return None,
        };
        if *slot != Role::Request {
            return None;
        }
        *slot = role;
        Some(reply)
    }

    /// The same topic owning its names, to keep past the text it was
    /// parsed from.
    #[cfg(feature = "alloc")]
    pub fn into_owned(self) -> Topic<'static> {
        match self {
            Topic::Shadow(t) => Topic::Shadow(ShadowTopic {
                thing: t.thing.into_owned(),
                shadow: t.shadow.map(ShadowName::into_owned),
                kind: t.kind,
            }),
            Topic::Jobs(t) => Topic::Jobs(JobsTopic {
                thing: t.thing.into_owned(),
                kind: match t.kind {
                    JobsTopicKind::Notify => JobsTopicKind::Notify,
                    JobsTopicKind::NotifyNext => JobsTopicKind::NotifyNext,
                    JobsTopicKind::GetPending(r) => JobsTopicKind::GetPending(r),
                    JobsTopicKind::StartNext(r) => JobsTopicKind::StartNext(r),
                    JobsTopicKind::Describe(id, r) => JobsTopicKind::Describe(id.into_owned(), r),
                    JobsTopicKind::DescribeNext(r) => JobsTopicKind::DescribeNext(r),
                    JobsTopicKind::Update(id, r) => JobsTopicKind::Update(id.into_owned(), r),
                },
            }),
            Topic::Stream(t) => Topic::Stream(StreamTopic {
                thing: t.thing.into_owned(),
                stream: t.stream.into_owned(),
                kind: t.kind,
                format: t.format,
            }),
            Topic::Provisioning(p) => Topic::Provisioning(p.into_owned()),
            Topic::Claim(c) => Topic::Claim(ClaimTopic {
                identity: c.identity.into_owned(),
                client: c.client.into_owned(),
                request: c.request.into_owned(),
            }),
            Topic::Command(c) => Topic::Command(CommandTopic {
                thing: c.thing.into_owned(),
                execution: c.execution.into_owned(),
                kind: c.kind,
                format: c.format,
            }),
            Topic::Presence(thing) => Topic::Presence(thing.into_owned()),
        }
    }

    /// The topic as text under `prefix`.
    #[cfg(feature = "alloc")]
    pub fn to_string_under(&self, prefix: &TopicPrefix<'_>) -> alloc::string::String {
        use alloc::string::ToString;
        self.display(prefix).to_string()
    }
}

impl ProvisioningTopic<'_> {
    /// The same topic owning its names.
    #[cfg(feature = "alloc")]
    pub fn into_owned(self) -> ProvisioningTopic<'static> {
        match self {
            Self::CreateKeysAndCertificate(f, r) => {
                ProvisioningTopic::CreateKeysAndCertificate(f, r)
            }
            Self::CreateCertificateFromCsr(f, r) => {
                ProvisioningTopic::CreateCertificateFromCsr(f, r)
            }
            Self::RegisterThing(t, f, r) => ProvisioningTopic::RegisterThing(t.into_owned(), f, r),
        }
    }
}

/// Parses the levels of a provisioning topic after the prefix (or after
/// `claims/{identity}/{client}`, where `provision` is left out).
fn parse_provisioning<'a>(
    levels: &[&'a str],
    with_provision: bool,
) -> Result<ProvisioningTopic<'a>, TopicError> {
    let role_of = |role: &[&str]| -> Result<Role, TopicError> {
        if role.len() > 1 {
            return Err(TopicError::Unknown);
        }
        Role::from_suffix(role.first().copied()).ok_or(TopicError::Unknown)
    };
    let format_of = |f: &str| Format::parse(f).ok_or(TopicError::Unknown);
    match levels {
        ["certificates", "create", format, role @ ..] => Ok(
            ProvisioningTopic::CreateKeysAndCertificate(format_of(format)?, role_of(role)?),
        ),
        ["certificates", "create-from-csr", format, role @ ..] => Ok(
            ProvisioningTopic::CreateCertificateFromCsr(format_of(format)?, role_of(role)?),
        ),
        [
            "provisioning-templates",
            template,
            "provision",
            format,
            role @ ..,
        ] if with_provision => Ok(ProvisioningTopic::RegisterThing(
            TemplateName::new(template)?,
            format_of(format)?,
            role_of(role)?,
        )),
        ["provisioning-templates", template, format, role @ ..] if !with_provision => {
            Ok(ProvisioningTopic::RegisterThing(
                TemplateName::new(template)?,
                format_of(format)?,
                role_of(role)?,
            ))
        }
        _ => Err(TopicError::Unknown),
    }
}

/// The levels of a provisioning topic, one by one to `level`.
fn provisioning_pieces<E>(
    p: &ProvisioningTopic<'_>,
    with_provision: bool,
    level: &mut impl FnMut(&str) -> Result<(), E>,
) -> Result<(), E> {
    let (format, role) = match p {
        ProvisioningTopic::CreateKeysAndCertificate(f, r) => {
            level("certificates")?;
            level("create")?;
            (f, r)
        }
        ProvisioningTopic::CreateCertificateFromCsr(f, r) => {
            level("certificates")?;
            level("create-from-csr")?;
            (f, r)
        }
        ProvisioningTopic::RegisterThing(template, f, r) => {
            level("provisioning-templates")?;
            level(template.as_str())?;
            if with_provision {
                level("provision")?;
            }
            (f, r)
        }
    };
    level(format.as_str())?;
    if let Some(s) = role.suffix() {
        level(s)?;
    }
    Ok(())
}

/// Formats a [`Topic`] under a prefix; made by [`Topic::display`].
#[derive(Debug, Clone, Copy)]
pub struct TopicDisplay<'t> {
    topic: &'t Topic<'t>,
    prefix: &'t TopicPrefix<'t>,
}

impl fmt::Display for TopicDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.topic.for_each_piece(self.prefix, |s| f.write_str(s))
    }
}

fn parse_shadow<'a>(thing: &'a str, rest: &[&'a str]) -> Result<Topic<'a>, TopicError> {
    let (shadow, rest) = match rest {
        ["name", name, rest @ ..] => (Some(ShadowName::new(name)?), rest),
        _ => (None, rest),
    };
    let kind = match rest {
        ["update", "delta"] => ShadowTopicKind::Delta,
        ["update", "documents"] => ShadowTopicKind::Documents,
        [op] => ShadowTopicKind::Op(
            ShadowOp::parse(op).ok_or(TopicError::Unknown)?,
            Role::Request,
        ),
        [op, role] => ShadowTopicKind::Op(
            ShadowOp::parse(op).ok_or(TopicError::Unknown)?,
            Role::from_suffix(Some(role)).ok_or(TopicError::Unknown)?,
        ),
        _ => return Err(TopicError::Unknown),
    };
    Ok(Topic::Shadow(ShadowTopic {
        thing: ThingName::new(thing)?,
        shadow,
        kind,
    }))
}

fn parse_jobs<'a>(thing: &'a str, rest: &[&'a str]) -> Result<Topic<'a>, TopicError> {
    let role = |r: Option<&&str>| Role::from_suffix(r.copied()).ok_or(TopicError::Unknown);
    let kind = match rest {
        ["notify"] => JobsTopicKind::Notify,
        ["notify-next"] => JobsTopicKind::NotifyNext,
        ["get", r @ ..] if r.len() <= 1 => JobsTopicKind::GetPending(role(r.first())?),
        ["start-next", r @ ..] if r.len() <= 1 => JobsTopicKind::StartNext(role(r.first())?),
        ["$next", "get", r @ ..] if r.len() <= 1 => JobsTopicKind::DescribeNext(role(r.first())?),
        [id, "get", r @ ..] if r.len() <= 1 => {
            JobsTopicKind::Describe(JobId::new(id)?, role(r.first())?)
        }
        [id, "update", r @ ..] if r.len() <= 1 => {
            JobsTopicKind::Update(JobId::new(id)?, role(r.first())?)
        }
        _ => return Err(TopicError::Unknown),
    };
    Ok(Topic::Jobs(JobsTopic {
        thing: ThingName::new(thing)?,
        kind,
    }))
}

/// A service that devices send requests to, for the filters a backend
/// subscribes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Service {
    /// Device shadows, classic and named.
    Shadows,
    /// Jobs.
    Jobs,
    /// File streams (OTA downloads).
    Streams,
    /// Fleet provisioning by claim.
    Provisioning,
    /// Commands: the devices' answers.
    Commands,
    /// Presence: the device agents' birth messages and last wills
    /// (`things/{thing}/presence`), with a broker that reports no
    /// lifecycle events of its own. Nothing is answered.
    Presence,
}

impl Service {
    /// The service's name, lower case (`shadows`, `jobs`, `streams`,
    /// `provisioning`, `commands`), as logs and metrics label it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shadows => "shadows",
            Self::Jobs => "jobs",
            Self::Streams => "streams",
            Self::Provisioning => "provisioning",
            Self::Commands => "commands",
            Self::Presence => "presence",
        }
    }

    /// The filters (below the prefix and its `/`) that match every request
    /// of the service and its own topics only.
    ///
    /// ```
    /// use fleet_core::topic::{Service, filter_matches};
    /// let f = Service::Shadows.request_filters();
    /// assert!(f.iter().any(|f| filter_matches(f, "things/t/shadow/name/s/update")));
    /// ```
    pub fn request_filters(self) -> &'static [&'static str] {
        match self {
            Self::Shadows => &[
                "things/+/shadow/get",
                "things/+/shadow/update",
                "things/+/shadow/delete",
                "things/+/shadow/name/+/get",
                "things/+/shadow/name/+/update",
                "things/+/shadow/name/+/delete",
            ],
            Self::Jobs => &[
                "things/+/jobs/get",
                "things/+/jobs/start-next",
                "things/+/jobs/+/get",
                "things/+/jobs/+/update",
            ],
            Self::Streams => &["things/+/streams/+/describe/+", "things/+/streams/+/get/+"],
            Self::Provisioning => &[
                "certificates/create/+",
                "certificates/create-from-csr/+",
                "provisioning-templates/+/provision/+",
                "claims/+/+/certificates/create/+",
                "claims/+/+/certificates/create-from-csr/+",
                "claims/+/+/provisioning-templates/+/+",
            ],
            Self::Commands => &["commands/things/+/executions/+/response/+"],
            Self::Presence => &["things/+/presence"],
        }
    }

    /// Every service.
    pub const ALL: [Service; 6] = [
        Self::Shadows,
        Self::Jobs,
        Self::Streams,
        Self::Provisioning,
        Self::Commands,
        Self::Presence,
    ];

    /// The request filters under `prefix`, prefixed
    /// (`$aws/things/+/shadow/+`, ...).
    #[cfg(feature = "alloc")]
    pub fn filters(self, prefix: &TopicPrefix<'_>) -> alloc::vec::Vec<alloc::string::String> {
        self.request_filters()
            .iter()
            .map(|f| alloc::format!("{}/{f}", prefix.as_str()))
            .collect()
    }

    /// The filters of the requests one thing (`thing`, or a broker's
    /// placeholder such as Mosquitto's `%u`) sends this service: what a
    /// broker's policy lets it write. Provisioning requests name no thing.
    #[cfg(feature = "alloc")]
    pub fn requests_of(
        self,
        prefix: &TopicPrefix<'_>,
        thing: &str,
    ) -> alloc::vec::Vec<alloc::string::String> {
        self.request_filters()
            .iter()
            .map(|f| {
                let f = f.replacen("things/+", &alloc::format!("things/{thing}"), 1);
                alloc::format!("{}/{f}", prefix.as_str())
            })
            .collect()
    }

    /// The filters of what the cloud sends one thing of this service, with
    /// `thing` in the thing's level: what a device subscribes to, and what
    /// a broker's policy lets it read.
    #[cfg(feature = "alloc")]
    pub fn device_filters(
        self,
        prefix: &TopicPrefix<'_>,
        thing: &str,
    ) -> alloc::vec::Vec<alloc::string::String> {
        let p = prefix.as_str();
        match self {
            Self::Shadows => alloc::vec![alloc::format!("{p}/things/{thing}/shadow/#")],
            Self::Jobs => alloc::vec![alloc::format!("{p}/things/{thing}/jobs/#")],
            Self::Streams => alloc::vec![alloc::format!("{p}/things/{thing}/streams/#")],
            Self::Provisioning => alloc::vec![
                alloc::format!("{p}/certificates/+/+/+"),
                alloc::format!("{p}/provisioning-templates/+/provision/+/+"),
            ],
            Self::Commands => alloc::vec![alloc::format!(
                "{p}/commands/things/{thing}/executions/+/request/+"
            )],
            // Nothing is sent to a device about its presence.
            Self::Presence => alloc::vec::Vec::new(),
        }
    }
}

/// Where the answer to a request that gave `response_topic` (MQTT 5) goes:
/// `{response_topic}/accepted` or `/rejected` as `role` says, if
/// `response_topic` lies in a client's own namespace
/// (`{prefix}/clients/{client id}/...`, without wildcards), which the broker
/// lets only that client read; `None` otherwise, so that a request cannot
/// make the cloud publish on someone else's topics.
///
/// ```
/// use fleet_core::topic::{Role, TopicPrefix, response_reply};
/// let p = TopicPrefix::AWS;
/// assert_eq!(response_reply(&p, "$aws/clients/c1/r7", Role::Accepted).as_deref(), Some("$aws/clients/c1/r7/accepted"));
/// assert_eq!(response_reply(&p, "$aws/things/t/shadow/update", Role::Accepted), None);
/// assert_eq!(response_reply(&p, "$aws/clients/+/r", Role::Rejected), None);
/// ```
#[cfg(feature = "alloc")]
pub fn response_reply(
    prefix: &TopicPrefix<'_>,
    response_topic: &str,
    role: Role,
) -> Option<alloc::string::String> {
    let own = response_topic
        .strip_prefix(prefix.as_str())
        .and_then(|r| r.strip_prefix("/clients/"))
        .and_then(|r| r.split_once('/'))
        .is_some_and(|(client, rest)| {
            !client.is_empty() && !rest.is_empty() && !response_topic.contains(['+', '#', '\0'])
        });
    let suffix = role.suffix()?;
    own.then(|| alloc::format!("{response_topic}/{suffix}"))
}

/// A topic in a client's own namespace, `{prefix}/clients/{client}/{name}`:
/// where a client asks the answers to its MQTT 5 requests to go. `None`
/// if `client` or `name` could widen it (empty, `/`, wildcards).
#[cfg(feature = "alloc")]
pub fn client_topic(
    prefix: &TopicPrefix<'_>,
    client: &str,
    name: &str,
) -> Option<alloc::string::String> {
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#', '\0']);
    (plain(client) && plain(name))
        .then(|| alloc::format!("{}/clients/{client}/{name}", prefix.as_str()))
}

/// The filter of a client's own namespace, `{prefix}/clients/{client}/#`,
/// where the answers to its MQTT 5 requests go ([`response_reply`]).
#[cfg(feature = "alloc")]
pub fn client_namespace(prefix: &TopicPrefix<'_>, client: &str) -> alloc::string::String {
    alloc::format!("{}/clients/{client}/#", prefix.as_str())
}

/// Whether `topic` matches the MQTT topic filter `filter` (`+` one level,
/// `#` the rest); wildcards at the first level do not match topics that
/// start with `$`, as MQTT says. The one matcher of the workspace: the
/// broker, the backend's dispatch and telemetry rules all use it.
///
/// ```
/// use fleet_core::topic::filter_matches;
/// assert!(filter_matches("dt/+/temp", "dt/dev-1/temp"));
/// assert!(filter_matches("dt/#", "dt/dev-1/a/b"));
/// assert!(filter_matches("dt/#", "dt"));
/// assert!(!filter_matches("dt/+/temp", "dt/dev-1/temp/x"));
/// assert!(!filter_matches("dt/+", "dt"));
/// assert!(!filter_matches("#", "$aws/things/t/shadow/get"));
/// ```
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::{String, ToString};

    fn t(s: &str) -> ThingName<'_> {
        ThingName::new(s).unwrap()
    }

    fn round_trip(prefix: &TopicPrefix<'_>, text: &str) -> String {
        let topic = Topic::parse(prefix, text).unwrap();
        topic.display(prefix).to_string()
    }

    #[test]
    fn every_documented_topic_round_trips() {
        let p = TopicPrefix::AWS;
        let topics = [
            "$aws/things/t/shadow/get",
            "$aws/things/t/shadow/get/accepted",
            "$aws/things/t/shadow/get/rejected",
            "$aws/things/t/shadow/update",
            "$aws/things/t/shadow/update/accepted",
            "$aws/things/t/shadow/update/rejected",
            "$aws/things/t/shadow/update/delta",
            "$aws/things/t/shadow/update/documents",
            "$aws/things/t/shadow/delete",
            "$aws/things/t/shadow/delete/accepted",
            "$aws/things/t/shadow/delete/rejected",
            "$aws/things/t/shadow/name/s/get",
            "$aws/things/t/shadow/name/s/update/delta",
            "$aws/things/t/shadow/name/s/update/documents",
            "$aws/things/t/shadow/name/s/delete/rejected",
            "$aws/things/t/jobs/notify",
            "$aws/things/t/jobs/notify-next",
            "$aws/things/t/jobs/get",
            "$aws/things/t/jobs/get/accepted",
            "$aws/things/t/jobs/start-next",
            "$aws/things/t/jobs/start-next/rejected",
            "$aws/things/t/jobs/job-1/get",
            "$aws/things/t/jobs/job-1/get/accepted",
            "$aws/things/t/jobs/job-1/update",
            "$aws/things/t/jobs/job-1/update/rejected",
            "$aws/things/t/jobs/$next/get",
            "$aws/things/t/jobs/$next/get/accepted",
            "$aws/things/t/streams/s1/describe/json",
            "$aws/things/t/streams/s1/description/cbor",
            "$aws/things/t/streams/s1/get/cbor",
            "$aws/things/t/streams/s1/data/json",
            "$aws/things/t/streams/s1/rejected/json",
            "$aws/certificates/create/json",
            "$aws/certificates/create/json/accepted",
            "$aws/certificates/create-from-csr/json",
            "$aws/certificates/create-from-csr/cbor/rejected",
            "$aws/provisioning-templates/factory/provision/json",
            "$aws/provisioning-templates/factory/provision/json/accepted",
            "$aws/commands/things/t/executions/e-1/request/json",
            "$aws/commands/things/t/executions/e-1/request/cbor",
            "$aws/commands/things/t/executions/e-1/response/json",
            "$aws/commands/things/t/executions/e-1/response/accepted/json",
            "$aws/commands/things/t/executions/e-1/response/rejected/cbor",
        ];
        for text in topics {
            assert_eq!(round_trip(&p, text), text);
        }
    }

    #[test]
    fn parses_into_the_expected_values() {
        let p = TopicPrefix::AWS;
        assert_eq!(
            Topic::parse(&p, "$aws/things/dev:1/shadow/name/cfg/update/delta").unwrap(),
            Topic::Shadow(ShadowTopic {
                thing: t("dev:1"),
                shadow: Some(ShadowName::new("cfg").unwrap()),
                kind: ShadowTopicKind::Delta,
            })
        );
        // A job may be called "notify": the level count disambiguates.
        assert_eq!(
            Topic::parse(&p, "$aws/things/d/jobs/notify/get").unwrap(),
            Topic::Jobs(JobsTopic {
                thing: t("d"),
                kind: JobsTopicKind::Describe(JobId::new("notify").unwrap(), Role::Request),
            })
        );
        assert_eq!(
            Topic::parse(&p, "$aws/things/d/jobs/get").unwrap(),
            Topic::Jobs(JobsTopic {
                thing: t("d"),
                kind: JobsTopicKind::GetPending(Role::Request),
            })
        );
        // A shadow called "name" is still a named shadow.
        assert_eq!(
            Topic::parse(&p, "$aws/things/d/shadow/name/name/get").unwrap(),
            Topic::Shadow(ShadowTopic {
                thing: t("d"),
                shadow: Some(ShadowName::new("name").unwrap()),
                kind: ShadowTopicKind::Op(ShadowOp::Get, Role::Request),
            })
        );
    }

    #[test]
    fn malformed_topics_get_typed_errors() {
        let p = TopicPrefix::AWS;
        let unknown = [
            "$aws/",
            "$aws/things",
            "$aws/things/t",
            "$aws/things/t/shadow",
            "$aws/things/t/shadow/patch",
            "$aws/things/t/shadow/get/maybe",
            "$aws/things/t/shadow/update/delta/accepted",
            "$aws/things/t/shadow/delete/delta",
            "$aws/things/t/shadow/name/s",
            "$aws/things/t/shadow/get/accepted/",
            "$aws/things/t/jobs",
            "$aws/things/t/jobs/notify/accepted",
            "$aws/things/t/jobs/j/delete",
            "$aws/things/t/streams/s/get",
            "$aws/things/t/streams/s/get/xml",
            "$aws/certificates/create/yaml",
            "$aws/certificates/revoke/json",
            "$aws/provisioning-templates/x/provision",
            "$aws/things/t/shadow/name/s/update/accepted/extra/levels",
            "$aws/commands/things/t/executions/e/request",
            "$aws/commands/things/t/executions/e/response/maybe/json",
            "$aws/commands/things/t/executions/e/request/accepted/json",
            "$aws/commands/things/t/executions/e/response/xml",
            "$aws/commands/clients/t/executions/e/request/json",
        ];
        for text in unknown {
            assert_eq!(Topic::parse(&p, text), Err(TopicError::Unknown), "{text}");
        }
        // The prefix alone has no topic level after it.
        assert_eq!(Topic::parse(&p, "$aws"), Err(TopicError::WrongPrefix));
        assert_eq!(
            Topic::parse(&p, "aws/things/t/shadow/get"),
            Err(TopicError::WrongPrefix)
        );
        assert_eq!(
            Topic::parse(&p, "$awsx/things/t/shadow/get"),
            Err(TopicError::WrongPrefix)
        );
        let err = Topic::parse(&p, "$aws/things/+/shadow/get").unwrap_err();
        assert!(
            matches!(err, TopicError::InvalidName(e) if e.kind() == crate::NameKind::ThingName)
        );
        assert!(matches!(
            Topic::parse(&p, "$aws/things//shadow/get"),
            Err(TopicError::InvalidName(_))
        ));
        assert!(matches!(
            Topic::parse(&p, "$aws/things/t/jobs/a:b/get"),
            Err(TopicError::InvalidName(_))
        ));
    }

    #[test]
    fn custom_prefixes() {
        let p = TopicPrefix::new("acme/v1").unwrap();
        assert_eq!(
            round_trip(&p, "acme/v1/things/t/shadow/get"),
            "acme/v1/things/t/shadow/get"
        );
        assert_eq!(
            Topic::parse(&p, "$aws/things/t/shadow/get"),
            Err(TopicError::WrongPrefix)
        );
        for bad in ["", "/a", "a/", "a//b", "a/+", "#", "a\0"] {
            assert_eq!(
                TopicPrefix::new(bad),
                Err(TopicError::InvalidPrefix),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn write_to_reports_the_needed_size() {
        let topic = Topic::Jobs(JobsTopic {
            thing: t("t"),
            kind: JobsTopicKind::NotifyNext,
        });
        let mut small = [0u8; 10];
        assert_eq!(
            topic.write_to(&TopicPrefix::AWS, &mut small),
            Err(TopicError::BufferTooSmall { needed: 30 })
        );
        let mut exact = [0u8; 30];
        assert_eq!(
            topic.write_to(&TopicPrefix::AWS, &mut exact).unwrap(),
            "$aws/things/t/jobs/notify-next"
        );
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Request),
            Just(Role::Accepted),
            Just(Role::Rejected)
        ]
    }

    fn format() -> impl Strategy<Value = Format> {
        prop_oneof![Just(Format::Json), Just(Format::Cbor)]
    }

    fn owned<T>(r: Result<T, NameError>) -> T {
        r.expect("strategy yields valid names")
    }

    fn any_topic() -> impl Strategy<Value = Topic<'static>> {
        let thing = "[a-zA-Z0-9:_-]{1,128}".prop_map(|s| owned(ThingName::try_from(s)));
        let shadow = proptest::option::of(
            "[a-zA-Z0-9:_-]{1,64}".prop_map(|s| owned(ShadowName::try_from(s))),
        );
        let job = "[a-zA-Z0-9_-]{1,64}".prop_map(|s| owned(JobId::try_from(s)));
        let stream = "[a-zA-Z0-9_-]{1,128}".prop_map(|s| owned(StreamId::try_from(s)));
        let template = "[a-zA-Z0-9_-]{1,36}".prop_map(|s| owned(TemplateName::try_from(s)));
        let shadow_op = prop_oneof![
            Just(ShadowOp::Get),
            Just(ShadowOp::Update),
            Just(ShadowOp::Delete)
        ];
        let shadow_kind = prop_oneof![
            (shadow_op, role()).prop_map(|(o, r)| ShadowTopicKind::Op(o, r)),
            Just(ShadowTopicKind::Delta),
            Just(ShadowTopicKind::Documents),
        ];
        let jobs_kind = prop_oneof![
            Just(JobsTopicKind::Notify),
            Just(JobsTopicKind::NotifyNext),
            role().prop_map(JobsTopicKind::GetPending),
            role().prop_map(JobsTopicKind::StartNext),
            (job.clone(), role()).prop_map(|(j, r)| JobsTopicKind::Describe(j, r)),
            role().prop_map(JobsTopicKind::DescribeNext),
            (job, role()).prop_map(|(j, r)| JobsTopicKind::Update(j, r)),
        ];
        let stream_kind = prop_oneof![
            Just(StreamTopicKind::Describe),
            Just(StreamTopicKind::Get),
            Just(StreamTopicKind::Description),
            Just(StreamTopicKind::Data),
            Just(StreamTopicKind::Rejected),
        ];
        prop_oneof![
            (thing.clone(), shadow, shadow_kind).prop_map(|(thing, shadow, kind)| {
                Topic::Shadow(ShadowTopic {
                    thing,
                    shadow,
                    kind,
                })
            }),
            (thing.clone(), jobs_kind)
                .prop_map(|(thing, kind)| Topic::Jobs(JobsTopic { thing, kind })),
            (thing, stream, stream_kind, format()).prop_map(|(thing, stream, kind, format)| {
                Topic::Stream(StreamTopic {
                    thing,
                    stream,
                    kind,
                    format,
                })
            }),
            (format(), role()).prop_map(|(f, r)| Topic::Provisioning(
                ProvisioningTopic::CreateKeysAndCertificate(f, r)
            )),
            (format(), role()).prop_map(|(f, r)| Topic::Provisioning(
                ProvisioningTopic::CreateCertificateFromCsr(f, r)
            )),
            (template, format(), role()).prop_map(|(t, f, r)| Topic::Provisioning(
                ProvisioningTopic::RegisterThing(t, f, r)
            )),
            thing_again().prop_map(Topic::Presence),
            (thing_again(), execution(), command_kind(), format()).prop_map(
                |(thing, execution, kind, format)| Topic::Command(CommandTopic {
                    thing,
                    execution,
                    kind,
                    format,
                })
            ),
        ]
    }

    fn thing_again() -> impl Strategy<Value = ThingName<'static>> {
        "[a-zA-Z0-9:_-]{1,128}".prop_map(|s| owned(ThingName::try_from(s)))
    }

    fn execution() -> impl Strategy<Value = JobId<'static>> {
        "[a-zA-Z0-9_-]{1,64}".prop_map(|s| owned(JobId::try_from(s)))
    }

    fn command_kind() -> impl Strategy<Value = CommandTopicKind> {
        prop_oneof![
            Just(CommandTopicKind::Request),
            role().prop_map(CommandTopicKind::Response),
        ]
    }

    proptest! {
        #[test]
        fn build_then_parse_is_identity(topic in any_topic(), custom in proptest::bool::ANY) {
            let prefix = if custom { TopicPrefix::new("fleet/dev").unwrap() } else { TopicPrefix::AWS };
            let text = topic.display(&prefix).to_string();
            prop_assert_eq!(text.len(), topic.len(&prefix));
            let mut buf = [0u8; 512];
            prop_assert_eq!(topic.write_to(&prefix, &mut buf).unwrap(), text.as_str());
            prop_assert_eq!(Topic::parse(&prefix, &text).unwrap(), topic);
        }

        #[test]
        fn replies_and_owned_copies_keep_the_topic(topic in any_topic()) {
            let text = topic.to_string_under(&TopicPrefix::AWS);
            let parsed = Topic::parse(&TopicPrefix::AWS, &text).unwrap().into_owned();
            prop_assert_eq!(&parsed, &topic);
            // A reply exists only for a request, and differs from it only
            // by its role; a reply of a reply is none.
            for role in [Role::Accepted, Role::Rejected] {
                match topic.reply(role) {
                    Some(reply) => {
                        prop_assert!(topic.is_from_device());
                        prop_assert!(!reply.is_from_device());
                        prop_assert_eq!(reply.service(), topic.service());
                        prop_assert_eq!(reply.thing(), topic.thing());
                        prop_assert!(reply.reply(role).is_none());
                    }
                    // Stream requests are answered on topics of their
                    // own; presence is not answered.
                    None => prop_assert!(
                        !topic.is_from_device()
                            || matches!(topic.service(), Service::Streams | Service::Presence)
                    ),
                }
            }
            // Every request is matched by its service's filters, nothing
            // the cloud sends is.
            let matched = Service::ALL.iter().filter(|s| {
                s.filters(&TopicPrefix::AWS).iter().any(|f| filter_matches(f, &text))
            }).count();
            prop_assert_eq!(matched, usize::from(topic.is_from_device()), "{}", text);
            if topic.is_from_device() {
                prop_assert!(topic.service().filters(&TopicPrefix::AWS).iter().any(|f| filter_matches(f, &text)));
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = Topic::parse(&TopicPrefix::AWS, &text);
        }

        #[test]
        fn random_topic_like_strings_never_panic(
            text in "(\\$aws|x)(/(things|shadow|jobs|name|get|update|accepted|streams|json|[a-z+#]{0,3})){0,9}"
        ) {
            if let Ok(topic) = Topic::parse(&TopicPrefix::AWS, &text) {
                // Whatever parses must print back to the same text.
                prop_assert_eq!(topic.display(&TopicPrefix::AWS).to_string(), text);
            }
        }
    }

    #[test]
    fn claim_topics_round_trip_and_refuse_wildcards() {
        let p = TopicPrefix::AWS;
        for text in [
            "$aws/claims/claim@factory/c-1/certificates/create-from-csr/json",
            "$aws/claims/claim@factory/c-1/certificates/create/json/accepted",
            "$aws/claims/claim@factory/c-1/provisioning-templates/factory/json",
            "$aws/claims/claim@factory/c-1/provisioning-templates/factory/json/rejected",
        ] {
            let t = Topic::parse(&p, text).unwrap();
            assert_eq!(t.service(), Service::Provisioning);
            assert_eq!(t.thing(), None);
            assert_eq!(t.display(&p).to_string(), text);
            assert_eq!(t.clone().into_owned(), t);
            // Within AWS's seven slashes.
            assert!(text.matches('/').count() <= 7, "{text}");
        }
        let request = Topic::parse(&p, "$aws/claims/a@f/c/provisioning-templates/t/json").unwrap();
        assert!(request.is_from_device());
        assert!(
            Service::Provisioning
                .filters(&p)
                .iter()
                .any(|f| filter_matches(f, "$aws/claims/a@f/c/provisioning-templates/t/json"))
        );
        for bad in [
            "$aws/claims/a+b/c/certificates/create/json",
            "$aws/claims/a@f/#/certificates/create/json",
            "$aws/claims/a@f/c/provisioning-templates/t/provision/json",
            "$aws/claims/a@f/c/certificates/create/json/accepted/x",
            "$aws/claims/a@f/c/things/t/shadow/update",
        ] {
            assert!(Topic::parse(&p, bad).is_err(), "{bad}");
        }
    }
}
