//! MQTT file streams: the service side of AWS IoT's MQTT-based file
//! delivery. Devices `describe` a stream and `get` blocks of its files, in
//! JSON or CBOR; OTA images reach devices this way.

use crate::Outgoing;
use crate::store::{StoreError, StoredStream, StreamStore};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use fleet_core::stream::{
    DataBlock, DescribeRequest, FileInfo, GetRequest, StreamDescription, StreamRejected,
};
use fleet_core::topic::{Service, StreamTopic, StreamTopicKind, Topic, TopicPrefix};

use crate::service::{Handler, HandlerError, Request};

#[derive(Debug)]
struct Stream {
    version: u32,
    description: String,
    files: Vec<Arc<Vec<u8>>>,
}

/// The streams a fleet serves, and the service that serves them.
///
/// It serves from a copy in memory of what its [`StreamStore`] keeps (read
/// by [`load`](Self::load)); [`save`](Self::save) writes to the store
/// before it serves. On a store other instances write to as well
/// (PostgreSQL), a request is answered only after the copy of its stream
/// was checked against the stored version ([`refresh`](Self::refresh)).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use fleet_cloud::StreamService;
/// use fleet_cloud::service::Request;
/// use fleet_core::TopicPrefix;
/// let streams = StreamService::new();
/// streams.save("fw-1-2", "firmware 1.2", vec![vec![7u8; 1000]]).await?;
/// let request = Request::from_broker(&TopicPrefix::AWS,
///     "$aws/things/pump-7/streams/fw-1-2/get/json",
///     br#"{"c":"t","f":0,"l":256,"o":3,"n":1}"#, 0).unwrap();
/// let out = streams.handle(&request).await?;
/// assert_eq!(out[0].topic, "$aws/things/pump-7/streams/fw-1-2/data/json");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct StreamService {
    streams: Arc<RwLock<HashMap<String, Stream>>>,
    store: Arc<dyn StreamStore>,
    prefix: String,
}

impl Default for StreamService {
    fn default() -> Self {
        Self::new()
    }
}

/// A stream could not be stored or loaded; the store's error is the
/// [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct StreamStoreError(StoreError);

impl std::fmt::Display for StreamStoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream store")
    }
}

impl std::error::Error for StreamStoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[async_trait::async_trait]
impl Handler for StreamService {
    fn service(&self) -> Service {
        Service::Streams
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, HandlerError> {
        StreamService::handle(self, request)
            .await
            .map_err(HandlerError::failed)
    }
}

impl From<StoreError> for StreamStoreError {
    fn from(e: StoreError) -> Self {
        Self(e)
    }
}

impl StreamService {
    /// No streams yet, kept in memory only.
    pub fn new() -> Self {
        Self {
            streams: Arc::default(),
            store: Arc::new(crate::MemoryStore::new()),
            prefix: "$aws".into(),
        }
    }

    /// The streams kept in `store` (those stored before are served again
    /// after a restart).
    pub async fn load(store: Arc<dyn StreamStore>) -> Result<Self, StreamStoreError> {
        let service = Self {
            streams: Arc::default(),
            store,
            prefix: "$aws".into(),
        };
        for (id, stream) in service.store.load_streams(None).await? {
            service.cache(id, stream);
        }
        Ok(service)
    }

    fn cache(&self, id: String, stream: StoredStream) {
        self.streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Stream {
                    version: stream.version,
                    description: stream.description,
                    files: stream.files.into_iter().map(Arc::new).collect(),
                },
            );
    }

    fn cached_version(&self, id: &str) -> Option<u32> {
        self.streams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map(|s| s.version)
    }

    /// The streams in the store (every instance's), by id after `after`,
    /// `limit` at most, without their files.
    pub async fn list(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<crate::store::StreamSummary>, StreamStoreError> {
        Ok(self.store.list_streams(after, limit).await?)
    }

    /// Stores `files` (file id = index) as stream `id` and serves them;
    /// replacing a stream raises its version, so a device reading the old
    /// one is told. Returns the version. A stream that cannot be stored is
    /// not served.
    pub async fn save(
        &self,
        id: &str,
        description: &str,
        files: Vec<Vec<u8>>,
    ) -> Result<u32, StreamStoreError> {
        let version = self.store.save_stream(id, description, &files).await?;
        self.cache(
            id.into(),
            StoredStream {
                version,
                description: description.into(),
                files,
            },
        );
        Ok(version)
    }

    /// Brings this instance's copy of stream `id` up to date with a store
    /// it shares with other instances; nothing to do for the other stores,
    /// which only this instance writes.
    pub async fn refresh(&self, id: &str) -> Result<(), StreamStoreError> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let stored = self.store.stream_version(id).await?;
        if stored == self.cached_version(id) {
            return Ok(());
        }
        let mut loaded = self.store.load_streams(Some(id)).await?;
        match loaded.pop() {
            Some((id, stream)) => self.cache(id, stream),
            None => {
                self.streams
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(id);
            }
        }
        Ok(())
    }

    /// A file of a stream.
    pub fn file(&self, id: &str, file: usize) -> Option<Arc<Vec<u8>>> {
        self.streams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)?
            .files
            .get(file)
            .cloned()
    }

    /// Stops serving a stream and forgets it in the store.
    pub async fn remove(&self, id: &str) -> Result<(), StreamStoreError> {
        self.store.delete_stream(id).await?;
        self.streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        Ok(())
    }

    /// The same service under another topic prefix (`$aws` by default).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, fleet_core::TopicError> {
        TopicPrefix::new(prefix)?;
        self.prefix = prefix.into();
        Ok(self)
    }

    /// Answers a device's stream request (`describe`, `get`). On a store
    /// other instances write to, the copy of the stream is first checked
    /// against the stored version ([`refresh`](Self::refresh)).
    pub async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, StreamStoreError> {
        let Topic::Stream(topic) = &request.topic else {
            return Ok(Vec::new());
        };
        self.refresh(topic.stream.as_str()).await?;
        Ok(self.answer(topic, request.payload))
    }

    /// The answer to a stream request, from this instance's copy.
    fn answer(&self, topic: &StreamTopic<'_>, payload: &[u8]) -> Vec<Outgoing> {
        let Ok(prefix) = TopicPrefix::new(&self.prefix) else {
            return Vec::new();
        };
        let (kind, format) = (topic.kind, topic.format);
        let stream_id = topic.stream.as_str();
        let reply = |kind: StreamTopicKind, payload: Vec<u8>| Outgoing {
            topic: Topic::Stream(StreamTopic {
                kind,
                ..topic.clone()
            })
            .to_string_under(&prefix),
            payload,
        };
        let reject = |token: Option<String>, code: &str, message: String| {
            vec![reply(
                StreamTopicKind::Rejected,
                StreamRejected {
                    client_token: token,
                    code: code.into(),
                    message,
                }
                .encode(format),
            )]
        };
        let streams = self.streams.read().unwrap_or_else(PoisonError::into_inner);
        match kind {
            StreamTopicKind::Describe => {
                let token = DescribeRequest::decode(payload, format)
                    .ok()
                    .and_then(|r| r.client_token);
                let Some(s) = streams.get(stream_id) else {
                    return reject(token, "ResourceNotFound", format!("no stream {stream_id}"));
                };
                vec![reply(
                    StreamTopicKind::Description,
                    StreamDescription {
                        client_token: token,
                        version: s.version,
                        description: Some(s.description.clone()),
                        files: s
                            .files
                            .iter()
                            .enumerate()
                            .map(|(i, f)| FileInfo {
                                file_id: u32::try_from(i).unwrap_or(u32::MAX),
                                size: f.len() as u64,
                            })
                            .collect(),
                    }
                    .encode(format),
                )]
            }
            StreamTopicKind::Get => {
                let request = match GetRequest::decode(payload, format) {
                    Ok(r) => r,
                    Err(e) => return reject(None, "InvalidRequest", e.to_string()),
                };
                let token = request.client_token.clone();
                let Some(s) = streams.get(stream_id) else {
                    return reject(token, "ResourceNotFound", format!("no stream {stream_id}"));
                };
                if request.version.is_some_and(|v| v != s.version) {
                    return reject(
                        token,
                        "VersionMismatch",
                        format!("the stream is at version {}", s.version),
                    );
                }
                let Some(file) = usize::try_from(request.file_id)
                    .ok()
                    .and_then(|i| s.files.get(i))
                else {
                    return reject(
                        token,
                        "ResourceNotFound",
                        format!("no file {}", request.file_id),
                    );
                };
                let blocks = match request.blocks() {
                    Ok(b) => b,
                    Err(e) => return reject(token, "InvalidRequest", e.to_string()),
                };
                let size = request.block_size as usize;
                let mut out = Vec::with_capacity(blocks.len());
                for id in blocks {
                    let start = usize::try_from(u64::from(id) * size as u64).unwrap_or(usize::MAX);
                    if start >= file.len() {
                        return reject(
                            token,
                            "BlockOutOfBounds",
                            format!("block {id} is past the end"),
                        );
                    }
                    let end = (start + size).min(file.len());
                    out.push(reply(
                        StreamTopicKind::Data,
                        DataBlock {
                            client_token: token.clone(),
                            file_id: request.file_id,
                            block_size: request.block_size,
                            block_id: id,
                            payload: file[start..end].to_vec(),
                        }
                        .encode(format),
                    ));
                }
                out
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_core::stream::Format;

    async fn ask(s: &StreamService, topic: &str, payload: &[u8]) -> Vec<Outgoing> {
        match Request::from_broker(&TopicPrefix::AWS, topic, payload, 0) {
            Some(r) => s.handle(&r).await.unwrap(),
            None => Vec::new(),
        }
    }

    #[tokio::test]
    async fn describe_get_and_refusals() {
        let s = StreamService::new();
        let image: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        assert_eq!(
            s.save("fw", "firmware", vec![image.clone()]).await.unwrap(),
            1
        );
        let base = "$aws/things/pump-7/streams/fw";
        for format in [Format::Json, Format::Cbor] {
            let f = format.as_str();
            let d = ask(
                &s,
                &format!("{base}/describe/{f}"),
                &DescribeRequest {
                    client_token: Some("t".into()),
                }
                .encode(format),
            )
            .await;
            assert_eq!(d[0].topic, format!("{base}/description/{f}"));
            let desc = StreamDescription::decode(&d[0].payload, format).unwrap();
            assert_eq!(
                (
                    desc.version,
                    desc.files[0].size,
                    desc.client_token.as_deref()
                ),
                (1, 1000, Some("t"))
            );

            let get = GetRequest {
                client_token: Some("g".into()),
                version: Some(1),
                file_id: 0,
                block_size: 256,
                offset: 2,
                count: 2,
                bitmap: None,
            };
            let blocks = ask(&s, &format!("{base}/get/{f}"), &get.encode(format)).await;
            assert_eq!(blocks.len(), 2);
            let last = DataBlock::decode(&blocks[1].payload, format).unwrap();
            assert_eq!((last.block_id, last.payload.as_slice()), (3, &image[768..]));

            for (payload, code) in [
                (
                    GetRequest {
                        version: Some(9),
                        ..get.clone()
                    }
                    .encode(format),
                    "VersionMismatch",
                ),
                (
                    GetRequest {
                        offset: 4,
                        count: 1,
                        ..get.clone()
                    }
                    .encode(format),
                    "BlockOutOfBounds",
                ),
                (
                    GetRequest {
                        file_id: 5,
                        ..get.clone()
                    }
                    .encode(format),
                    "ResourceNotFound",
                ),
                (b"nonsense".to_vec(), "InvalidRequest"),
            ] {
                let r = ask(&s, &format!("{base}/get/{f}"), &payload).await;
                assert_eq!(r[0].topic, format!("{base}/rejected/{f}"));
                assert_eq!(
                    StreamRejected::decode(&r[0].payload, format).unwrap().code,
                    code
                );
            }
        }
        let none = ask(&s, "$aws/things/pump-7/streams/other/describe/json", b"{}").await;
        assert_eq!(
            StreamRejected::decode(&none[0].payload, Format::Json)
                .unwrap()
                .code,
            "ResourceNotFound"
        );
        assert!(
            ask(&s, "$aws/things/pump-7/shadow/get", b"")
                .await
                .is_empty()
        );
        assert!(ask(&s, &format!("{base}/get/xml"), b"").await.is_empty());
        assert_eq!(
            s.save("fw", "firmware", vec![image]).await.unwrap(),
            2,
            "a replaced stream has a new version"
        );
    }

    #[tokio::test]
    async fn stored_streams_are_served_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let open = || async {
            let store = crate::SqliteStore::open(&path).unwrap();
            StreamService::load(Arc::new(store)).await.unwrap()
        };
        let s = open().await;
        s.save("fw", "firmware", vec![vec![1; 300], vec![2; 10]])
            .await
            .unwrap();
        s.save("gone", "x", vec![vec![3]]).await.unwrap();
        s.remove("gone").await.unwrap();
        drop(s);
        let s = open().await;
        let d = ask(&s, "$aws/things/t/streams/fw/describe/json", b"{}").await;
        let desc = StreamDescription::decode(&d[0].payload, Format::Json).unwrap();
        assert_eq!(
            (desc.version, desc.files.len(), desc.files[0].size),
            (1, 2, 300)
        );
        let r = ask(&s, "$aws/things/t/streams/gone/describe/json", b"{}").await;
        assert!(r[0].topic.ends_with("/rejected/json"));
        assert_eq!(s.save("fw", "firmware", vec![vec![4]]).await.unwrap(), 2);
    }
}
