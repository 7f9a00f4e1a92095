//! MQTT file streams: the service side of AWS IoT's MQTT-based file
//! delivery. Devices `describe` a stream and `get` blocks of its files, in
//! JSON or CBOR; OTA images reach devices this way.

use crate::Outgoing;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use fleet_core::stream::{
    DataBlock, DescribeRequest, FileInfo, Format, GetRequest, StreamDescription, StreamRejected,
};
use fleet_core::topic::{StreamTopic, StreamTopicKind, Topic, TopicPrefix};

#[derive(Debug)]
struct Stream {
    version: u32,
    description: String,
    files: Vec<Arc<Vec<u8>>>,
}

/// The streams a fleet serves, and the service that serves them.
///
/// ```
/// use fleet_cloud::StreamService;
/// let streams = StreamService::new();
/// streams.put("fw-1-2", "firmware 1.2", vec![vec![7u8; 1000]]);
/// let out = streams.handle("$aws/things/pump-7/streams/fw-1-2/get/json",
///     br#"{"c":"t","f":0,"l":256,"o":3,"n":1}"#);
/// assert_eq!(out[0].topic, "$aws/things/pump-7/streams/fw-1-2/data/json");
/// ```
#[derive(Debug, Clone, Default)]
pub struct StreamService {
    streams: Arc<RwLock<HashMap<String, Stream>>>,
    /// Where streams are kept across restarts (`None`: memory only).
    db: Option<Arc<std::sync::Mutex<rusqlite::Connection>>>,
    /// Streams shared by every instance on one PostgreSQL (`streams` is
    /// then this instance's copy, brought up to date by
    /// [`refresh`](Self::refresh)).
    pg: Option<crate::PgStore>,
}

/// A stream could not be stored or loaded.
#[derive(Debug)]
pub struct StreamStoreError(String);

impl std::fmt::Display for StreamStoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream store: {}", self.0)
    }
}

impl std::error::Error for StreamStoreError {}

fn db_err(e: impl std::fmt::Display) -> StreamStoreError {
    StreamStoreError(e.to_string())
}

impl StreamService {
    /// No streams yet, in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Streams kept in the SQLite database at `path` (a table of their
    /// own, so it may be the fleet's database): those stored before are
    /// served again after a restart, and every [`put`](Self::put) is
    /// written before it returns.
    pub fn open(path: &std::path::Path) -> Result<Self, StreamStoreError> {
        let conn = rusqlite::Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS stream_files (
                 stream TEXT NOT NULL, version INTEGER NOT NULL, description TEXT NOT NULL,
                 file INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (stream, file)
             ) STRICT;",
        )
        .map_err(db_err)?;
        let mut streams: HashMap<String, Stream> = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT stream, version, description, file, data FROM stream_files ORDER BY stream, file")
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ))
                })
                .map_err(db_err)?;
            for row in rows {
                let (id, version, description, data) = row.map_err(db_err)?;
                let s = streams.entry(id).or_insert_with(|| Stream {
                    version,
                    description,
                    files: Vec::new(),
                });
                s.files.push(Arc::new(data));
            }
        }
        Ok(Self {
            streams: Arc::new(RwLock::new(streams)),
            db: Some(Arc::new(std::sync::Mutex::new(conn))),
            pg: None,
        })
    }

    /// Streams kept in PostgreSQL, shared by every instance on the same
    /// database: a stream one instance [`save`](Self::save)s, the others
    /// serve too (each keeps a copy, checked against the database's version
    /// before each request it answers).
    pub async fn postgres(store: &crate::PgStore) -> Result<Self, StreamStoreError> {
        let service = Self {
            pg: Some(store.clone()),
            ..Self::default()
        };
        for (id, stream) in store.load_streams(None).await.map_err(db_err)? {
            service.cache(id, stream);
        }
        Ok(service)
    }

    fn cache(&self, id: String, stream: (u32, String, Vec<Vec<u8>>)) {
        let (version, description, files) = stream;
        self.streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Stream {
                    version,
                    description,
                    files: files.into_iter().map(Arc::new).collect(),
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

    /// Stores `files` as stream `id` in whatever backs this service (memory,
    /// SQLite or PostgreSQL) and serves them; replacing a stream raises its
    /// version. Returns the version.
    pub async fn save(
        &self,
        id: &str,
        description: &str,
        files: Vec<Vec<u8>>,
    ) -> Result<u32, StreamStoreError> {
        match &self.pg {
            Some(pg) => {
                let version = pg
                    .save_stream(id, description, &files)
                    .await
                    .map_err(db_err)?;
                self.cache(id.into(), (version, description.into(), files));
                Ok(version)
            }
            None => {
                let (this, id, description) =
                    (self.clone(), id.to_string(), description.to_string());
                tokio::task::spawn_blocking(move || this.try_put(&id, &description, files))
                    .await
                    .map_err(db_err)?
            }
        }
    }

    /// Brings this instance's copy of stream `id` up to date with the
    /// database it shares with other instances (PostgreSQL); nothing to do
    /// for the other stores, which only this instance writes.
    pub async fn refresh(&self, id: &str) -> Result<(), StreamStoreError> {
        let Some(pg) = &self.pg else {
            return Ok(());
        };
        let stored = pg.stream_version(id).await.map_err(db_err)?;
        if stored == self.cached_version(id) {
            return Ok(());
        }
        let mut loaded = pg.load_streams(Some(id)).await.map_err(db_err)?;
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

    /// [`refresh`](Self::refresh) for the stream a request on `topic` (under
    /// `prefix`) names; nothing for other topics.
    pub async fn refresh_for(
        &self,
        prefix: &TopicPrefix<'_>,
        topic: &str,
    ) -> Result<(), StreamStoreError> {
        if self.pg.is_none() {
            return Ok(());
        }
        match Topic::parse(prefix, topic) {
            Ok(Topic::Stream(t)) => self.refresh(t.stream.as_str()).await,
            _ => Ok(()),
        }
    }

    /// As [`put`](Self::put), reporting a failure to store the stream (a
    /// stream that cannot be stored is not served).
    pub fn try_put(
        &self,
        id: &str,
        description: &str,
        files: Vec<Vec<u8>>,
    ) -> Result<u32, StreamStoreError> {
        if self.pg.is_some() {
            return Err(StreamStoreError(
                "streams in PostgreSQL are written with `save`".into(),
            ));
        }
        let version = self
            .streams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map_or(1, |s| s.version + 1);
        if let Some(db) = &self.db {
            let mut conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn.transaction().map_err(db_err)?;
            tx.execute("DELETE FROM stream_files WHERE stream = ?1", [id])
                .map_err(db_err)?;
            for (i, f) in files.iter().enumerate() {
                tx.execute(
                    "INSERT INTO stream_files (stream, version, description, file, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                    (id, version, description, i as i64, f),
                )
                .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)?;
        }
        self.streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.into(),
                Stream {
                    version,
                    description: description.into(),
                    files: files.into_iter().map(Arc::new).collect(),
                },
            );
        Ok(version)
    }

    /// Serves `files` (file id = index) as stream `id`; replacing a stream
    /// raises its version, so a device reading the old one is told.
    /// Returns the version. A store failure is logged and the stream not
    /// served; [`try_put`](Self::try_put) returns it.
    pub fn put(&self, id: &str, description: &str, files: Vec<Vec<u8>>) -> u32 {
        match self.try_put(id, description, files) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("{e}");
                0
            }
        }
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

    /// Stops serving a stream (and forgets it in the store).
    pub async fn remove(&self, id: &str) {
        if let Some(pg) = &self.pg
            && let Err(e) = pg.delete_stream(id).await
        {
            tracing::error!("stream store: {e}");
        }
        if let Some(db) = &self.db {
            let conn = db.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = conn.execute("DELETE FROM stream_files WHERE stream = ?1", [id]) {
                tracing::error!("stream store: {e}");
            }
        }
        self.streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// The topic filters of stream requests under `prefix`.
    pub fn filters(prefix: &str) -> Vec<String> {
        fleet_core::topic::Service::Streams
            .request_filters()
            .iter()
            .map(|f| format!("{prefix}/{f}"))
            .collect()
    }

    /// Answers a request under the `$aws` prefix; nothing for a topic that
    /// is not a stream request.
    pub fn handle(&self, topic: &str, payload: &[u8]) -> Vec<Outgoing> {
        self.handle_under(&TopicPrefix::AWS, topic, payload)
    }

    /// Answers a request under `prefix`.
    pub fn handle_under(
        &self,
        prefix: &TopicPrefix<'_>,
        topic: &str,
        payload: &[u8],
    ) -> Vec<Outgoing> {
        let Some((base, kind, format)) = topic
            .rsplit_once('/')
            .and_then(|(rest, fmt)| Some((rest, Format::parse(fmt)?)))
            .and_then(|(rest, format)| {
                let Ok(Topic::Stream(StreamTopic { kind, .. })) = Topic::parse(prefix, topic)
                else {
                    return None;
                };
                let base = rest.rsplit_once('/')?.0.to_string();
                Some((base, kind, format))
            })
        else {
            return Vec::new();
        };
        let stream_id = base.rsplit('/').next().unwrap_or_default().to_string();
        let reply = |kind: &str, payload: Vec<u8>| Outgoing {
            topic: format!("{base}/{kind}/{}", format.as_str()),
            payload,
        };
        let reject = |token: Option<String>, code: &str, message: String| {
            vec![reply(
                "rejected",
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
                let Some(s) = streams.get(&stream_id) else {
                    return reject(token, "ResourceNotFound", format!("no stream {stream_id}"));
                };
                vec![reply(
                    "description",
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
                let Some(s) = streams.get(&stream_id) else {
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
                        "data",
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

    #[test]
    fn describe_get_and_refusals() {
        let s = StreamService::new();
        let image: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        assert_eq!(s.put("fw", "firmware", vec![image.clone()]), 1);
        let base = "$aws/things/pump-7/streams/fw";
        for format in [Format::Json, Format::Cbor] {
            let f = format.as_str();
            let d = s.handle(
                &format!("{base}/describe/{f}"),
                &DescribeRequest {
                    client_token: Some("t".into()),
                }
                .encode(format),
            );
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
            let blocks = s.handle(&format!("{base}/get/{f}"), &get.encode(format));
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
                let r = s.handle(&format!("{base}/get/{f}"), &payload);
                assert_eq!(r[0].topic, format!("{base}/rejected/{f}"));
                assert_eq!(
                    StreamRejected::decode(&r[0].payload, format).unwrap().code,
                    code
                );
            }
        }
        let none = s.handle("$aws/things/pump-7/streams/other/describe/json", b"{}");
        assert_eq!(
            StreamRejected::decode(&none[0].payload, Format::Json)
                .unwrap()
                .code,
            "ResourceNotFound"
        );
        assert!(s.handle("$aws/things/pump-7/shadow/get", b"").is_empty());
        assert!(s.handle(&format!("{base}/get/xml"), b"").is_empty());
        assert_eq!(
            s.put("fw", "firmware", vec![image]),
            2,
            "a replaced stream has a new version"
        );
    }

    #[tokio::test]
    async fn stored_streams_are_served_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let s = StreamService::open(&path).unwrap();
        s.try_put("fw", "firmware", vec![vec![1; 300], vec![2; 10]])
            .unwrap();
        s.try_put("gone", "x", vec![vec![3]]).unwrap();
        s.remove("gone").await;
        drop(s);
        let s = StreamService::open(&path).unwrap();
        let d = s.handle("$aws/things/t/streams/fw/describe/json", b"{}");
        let desc = StreamDescription::decode(&d[0].payload, Format::Json).unwrap();
        assert_eq!(
            (desc.version, desc.files.len(), desc.files[0].size),
            (1, 2, 300)
        );
        let r = s.handle("$aws/things/t/streams/gone/describe/json", b"{}");
        assert!(r[0].topic.ends_with("/rejected/json"));
        assert_eq!(s.try_put("fw", "firmware", vec![vec![4]]).unwrap(), 2);
    }
}
