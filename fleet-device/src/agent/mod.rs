//! The agent: a thin pump between MQTT (rumqttc over rustls) and the
//! fleet-core engines.
//!
//! - [`types`]: what the application sees (errors, events, deliveries,
//!   snapshots, the reconnection backoff);
//! - [`builder`]: [`AgentBuilder`], which checks the configuration and
//!   starts the pump;
//! - [`handle`]: [`Agent`], the application's handle: each call is a
//!   command to the pump;
//! - [`pump`]: the one task that owns the MQTT client, the outbox and
//!   fleet-core's state machines (`ShadowSync`, `JobRunner`, `CommandInbox`)
//!   and moves messages between them; `pump::ota` drives over-the-air
//!   updates (`OtaUpdate` and the stream download `BlockDownload`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::jobs::{
    CommandInbox, CommandStatus, Delivery as CommandDelivery, JobEvent, JobRunner, JobStatus,
    RunnerConfig, UpdateId,
};
use fleet_core::ota::{BlockDownload, DownloadConfig, DownloadEvent};
use fleet_core::shadow::{RequestId, ShadowEvent, ShadowSync, SyncConfig};
use fleet_core::time::Instant as CoreInstant;
use fleet_core::topic::{
    CommandTopic, CommandTopicKind, Format, JobsTopic, JobsTopicKind, Role, Service, Topic,
    TopicPrefix,
};
use fleet_core::transmit::Transmit;
use fleet_core::{JobId, ShadowName, StreamId, ThingName};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::key::DeviceKey;
use crate::mqtt::{self, Client, Ev, Protocol};
use crate::ota::OtaSettings;
use crate::outbox::{MessageKind, Outbox, OutboxError, Overflow};

mod builder;
mod handle;
mod pump;
mod types;

pub use builder::AgentBuilder;
pub(crate) use builder::KeySource;
pub use handle::Agent;
use handle::Command;
use pump::Pump;
pub use types::{AgentError, AgentEvent, Backoff, Delivery, Inventory, Qos, ShadowSnapshot};
