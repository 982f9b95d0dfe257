//! In-memory object clients for tests and the FUSE-ceiling benchmark: the read
//! engine and the filesystem run against these without a network.
//!
//! [`MemClient`] holds objects in memory, delivers reads in chunks of at most
//! 2 MiB into the caller's sink (as a stream would), can add a latency to every
//! read, and counts requests and bytes fetched. [`FaultyClient`] wraps any
//! [`ObjectClient`] and fails every Nth read with UNAVAILABLE.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{GcsError, ListPage, ObjectClient, ObjectId, ObjectInfo, RangeSink};

const CHUNK: usize = 2 << 20;

/// Objects in memory.
#[derive(Default)]
pub struct MemClient {
    objects: RwLock<HashMap<String, (ObjectInfo, Bytes)>>,
    next_generation: AtomicU64,
    /// Added before every read's first byte.
    pub latency: Duration,
    /// Reads served.
    pub requests: AtomicU64,
    /// Bytes delivered to sinks.
    pub fetched: AtomicU64,
}

impl std::fmt::Debug for MemClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemClient")
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .field("fetched", &self.fetched.load(Ordering::Relaxed))
            .finish()
    }
}

impl MemClient {
    pub fn new(latency: Duration) -> Arc<MemClient> {
        Arc::new(MemClient {
            latency,
            next_generation: AtomicU64::new(1),
            ..Default::default()
        })
    }

    /// Creates or replaces an object (a new generation); returns its metadata.
    pub fn put(&self, name: &str, data: impl Into<Bytes>, finalized: bool) -> ObjectInfo {
        let data = data.into();
        let info = ObjectInfo {
            name: name.to_string(),
            size: data.len() as u64,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed) as i64 + 1,
            metageneration: 1,
            finalized,
            update_time: SystemTime::now(),
            create_time: SystemTime::now(),
            crc32c: finalized.then(|| crc32c::crc32c(&data)),
        };
        let mut objects = crate::sync::write(&self.objects);
        objects.insert(name.to_string(), (info.clone(), data));
        info
    }

    /// Appends to an appendable object, keeping its generation.
    pub fn append(&self, name: &str, more: &[u8]) -> Option<ObjectInfo> {
        let mut objects = crate::sync::write(&self.objects);
        let (info, data) = objects.get_mut(name)?;
        let mut v = data.to_vec();
        v.extend_from_slice(more);
        *data = Bytes::from(v);
        info.size = data.len() as u64;
        Some(info.clone())
    }

    /// Deletes an object.
    pub fn delete(&self, name: &str) -> bool {
        crate::sync::write(&self.objects).remove(name).is_some()
    }

    fn get(&self, name: &str) -> Option<(ObjectInfo, Bytes)> {
        let objects = crate::sync::read(&self.objects);
        objects.get(name).cloned()
    }
}

#[tonic::async_trait]
impl ObjectClient for MemClient {
    async fn stat(&self, name: &str) -> Result<ObjectInfo, GcsError> {
        self.get(name)
            .map(|(i, _)| i)
            .ok_or_else(|| GcsError::NotFound(format!("mem://{name}")))
    }

    async fn list(&self, prefix: &str, _page_token: Option<String>) -> Result<ListPage, GcsError> {
        let objects = crate::sync::read(&self.objects);
        let mut page = ListPage::default();
        let mut names: Vec<&String> = objects.keys().filter(|n| n.starts_with(prefix)).collect();
        names.sort();
        for n in names {
            match n[prefix.len()..].find('/') {
                Some(i) => {
                    let p = n[..prefix.len() + i + 1].to_string();
                    if page.prefixes.last() != Some(&p) {
                        page.prefixes.push(p);
                    }
                }
                None => page.objects.push(objects[n].0.clone()),
            }
        }
        Ok(page)
    }

    async fn read(
        &self,
        object: &ObjectId,
        _size_hint: u64,
        offset: u64,
        len: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<u64, GcsError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let (info, data) = self
            .get(&object.name)
            .ok_or_else(|| GcsError::NotFound(format!("mem://{}", object.name)))?;
        if info.generation != object.generation {
            return Err(GcsError::NotFound(format!(
                "mem://{}#{}: generation gone",
                object.name, object.generation
            )));
        }
        if offset > data.len() as u64 {
            return Err(GcsError::OutOfRange(format!("mem://{}", object.name)));
        }
        let end = offset.saturating_add(len).min(data.len() as u64) as usize;
        let mut at = offset as usize;
        while at < end {
            let n = CHUNK.min(end - at);
            sink.put(at - offset as usize, &data[at..at + n]);
            at += n;
            self.fetched.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok((end as u64).saturating_sub(offset))
    }
}

/// Wraps a client and fails every Nth read with UNAVAILABLE (after writing
/// nothing), to test how callers handle failures.
pub struct FaultyClient<C> {
    pub inner: Arc<C>,
    pub every: u64,
    count: AtomicU64,
}

impl<C> FaultyClient<C> {
    pub fn new(inner: Arc<C>, every: u64) -> Arc<FaultyClient<C>> {
        Arc::new(FaultyClient {
            inner,
            every: every.max(1),
            count: AtomicU64::new(0),
        })
    }
}

#[tonic::async_trait]
impl<C: ObjectClient> ObjectClient for FaultyClient<C> {
    fn parallelism(&self, size: u64) -> usize {
        self.inner.parallelism(size)
    }

    fn paces_above(&self) -> u64 {
        self.inner.paces_above()
    }

    async fn stat(&self, name: &str) -> Result<ObjectInfo, GcsError> {
        self.inner.stat(name).await
    }

    async fn list(&self, prefix: &str, page_token: Option<String>) -> Result<ListPage, GcsError> {
        self.inner.list(prefix, page_token).await
    }

    async fn read(
        &self,
        object: &ObjectId,
        size_hint: u64,
        offset: u64,
        len: u64,
        sink: Arc<dyn RangeSink>,
    ) -> Result<u64, GcsError> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(self.every) {
            return Err(GcsError::Unavailable("injected read failure".into()));
        }
        self.inner.read(object, size_hint, offset, len, sink).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcs::VecSink;

    #[tokio::test]
    async fn reads_generations_and_faults() {
        let m = MemClient::new(Duration::ZERO);
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let info = m.put("a/b", data.clone(), true);
        let id = ObjectId {
            name: "a/b".into(),
            generation: info.generation,
        };
        let sink = VecSink::new(3_000_000);
        assert_eq!(
            m.read(&id, 0, 100, 3_000_000, sink.clone()).await.unwrap(),
            3_000_000
        );
        assert_eq!(sink.take(), &data[100..3_000_100]);
        let short = VecSink::new(100);
        assert_eq!(m.read(&id, 0, 4_999_950, 100, short).await.unwrap(), 50);
        m.put("a/b", vec![1u8; 10], true);
        assert!(matches!(
            m.read(&id, 0, 0, 1, VecSink::new(1)).await,
            Err(GcsError::NotFound(_))
        ));
        let page = m.list("", None).await.unwrap();
        assert_eq!(page.prefixes, ["a/"]);
        let f = FaultyClient::new(m.clone(), 2);
        let info = m.stat("a/b").await.unwrap();
        let id = ObjectId {
            name: "a/b".into(),
            generation: info.generation,
        };
        assert!(f.read(&id, 0, 0, 1, VecSink::new(1)).await.is_ok());
        assert!(f.read(&id, 0, 0, 1, VecSink::new(1)).await.is_err());
    }
}
