//! In-memory object clients for tests and the FUSE-ceiling benchmark: the read
//! engine and the filesystem run against these without a network.
//!
//! [`MemClient`] holds objects (and folders) in memory, delivers reads in
//! chunks of at most 2 MiB into the caller's sink (as a stream would), can add
//! a latency to every read, and counts requests and bytes fetched. It writes
//! too, as the service does: appendable objects written through a
//! [`MemWriter`] grow by what each flush persists. [`FaultyClient`] wraps any
//! [`ObjectClient`] and fails every Nth read with UNAVAILABLE.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{GcsError, ListPage, ObjectClient, ObjectId, ObjectInfo, ObjectWrite, RangeSink};

const CHUNK: usize = 2 << 20;

type Objects = HashMap<String, (ObjectInfo, Bytes)>;

/// Objects in memory.
#[derive(Default)]
pub struct MemClient {
    objects: Arc<RwLock<Objects>>,
    /// Folders, each with its trailing `/`.
    folders: RwLock<BTreeSet<String>>,
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
            generation: self.new_generation(),
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

    /// The live version of `name` and its bytes.
    pub fn get(&self, name: &str) -> Option<(ObjectInfo, Bytes)> {
        let objects = crate::sync::read(&self.objects);
        objects.get(name).cloned()
    }

    fn new_generation(&self) -> i64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed) as i64 + 1
    }

    /// The folders (with their `/`).
    pub fn folders(&self) -> Vec<String> {
        crate::sync::read(&self.folders).iter().cloned().collect()
    }
}

fn missing(name: &str) -> GcsError {
    GcsError::NotFound(format!("mem://{name}"))
}

/// An appendable object being written into a [`MemClient`]: the pieces
/// written wait in the writer, held as given (as the real writer holds its
/// chunks, so memory tests see the same lifetimes), until a flush persists
/// them (appends them to the object).
pub struct MemWriter {
    objects: Arc<RwLock<Objects>>,
    name: String,
    generation: i64,
    persisted: u64,
    pending: Vec<Bytes>,
}

impl MemWriter {
    fn persist(&mut self, finalize: bool) -> Result<ObjectInfo, GcsError> {
        let mut objects = crate::sync::write(&self.objects);
        let (info, data) = objects
            .get_mut(&self.name)
            .filter(|(i, _)| i.generation == self.generation)
            .ok_or_else(|| missing(&self.name))?;
        if info.finalized {
            return Err(GcsError::PreconditionFailed(format!(
                "mem://{} is finalized",
                self.name
            )));
        }
        if !self.pending.is_empty() {
            let mut v = data.to_vec();
            for p in self.pending.drain(..) {
                v.extend_from_slice(&p);
            }
            *data = Bytes::from(v);
        }
        info.size = data.len() as u64;
        info.update_time = SystemTime::now();
        if finalize {
            info.finalized = true;
            info.crc32c = Some(crc32c::crc32c(data));
        }
        self.persisted = info.size;
        Ok(info.clone())
    }
}

#[tonic::async_trait]
impl ObjectWrite for MemWriter {
    fn generation(&self) -> i64 {
        self.generation
    }

    fn written(&self) -> u64 {
        self.persisted + self.pending.iter().map(|p| p.len() as u64).sum::<u64>()
    }

    fn persisted(&self) -> u64 {
        self.persisted
    }

    async fn write(&mut self, data: Bytes) -> Result<(), GcsError> {
        self.pending.push(data);
        Ok(())
    }

    /// Checks the caller's chunk CRC32Cs as the service would.
    async fn write_with_crcs(&mut self, data: Bytes, crcs: Vec<u32>) -> Result<(), GcsError> {
        let chunk = crate::gcs::write::MAX_CHUNK;
        if crcs.len() == data.len().div_ceil(chunk) {
            for (i, (part, want)) in data.chunks(chunk).zip(&crcs).enumerate() {
                if crc32c::crc32c(part) != *want {
                    return Err(GcsError::DataLoss(format!(
                        "mem://{}: chunk {i} does not match its CRC32C",
                        self.name
                    )));
                }
            }
        }
        self.write(data).await
    }

    async fn flush(&mut self) -> Result<u64, GcsError> {
        Ok(self.persist(false)?.size)
    }

    async fn close(mut self: Box<Self>) -> Result<u64, GcsError> {
        Ok(self.persist(false)?.size)
    }

    async fn finalize(mut self: Box<Self>) -> Result<ObjectInfo, GcsError> {
        self.persist(true)
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
        let folders = crate::sync::read(&self.folders);
        let mut prefixes = BTreeSet::new();
        for n in names {
            match n[prefix.len()..].find('/') {
                Some(i) => {
                    prefixes.insert(n[..prefix.len() + i + 1].to_string());
                }
                None => page.objects.push(objects[n].0.clone()),
            }
        }
        // A folder below the prefix shows as the prefix of its first level.
        for f in folders
            .iter()
            .filter(|f| f.len() > prefix.len() && f.starts_with(prefix))
        {
            if let Some(i) = f[prefix.len()..].find('/') {
                prefixes.insert(f[..prefix.len() + i + 1].to_string());
            }
        }
        page.prefixes = prefixes.into_iter().collect();
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

    async fn create(
        &self,
        name: &str,
        if_generation_match: Option<i64>,
    ) -> Result<Box<dyn ObjectWrite>, GcsError> {
        let generation = self.new_generation();
        let mut objects = crate::sync::write(&self.objects);
        let live = objects.get(name).map_or(0, |(i, _)| i.generation);
        if if_generation_match.is_some_and(|g| g != live) {
            return Err(GcsError::PreconditionFailed(format!(
                "mem://{name}: if_generation_match"
            )));
        }
        let info = ObjectInfo::created(name, generation);
        objects.insert(name.to_string(), (info, Bytes::new()));
        Ok(Box::new(MemWriter {
            objects: self.objects.clone(),
            name: name.to_string(),
            generation,
            persisted: 0,
            pending: Vec::new(),
        }))
    }

    async fn append(&self, name: &str, generation: i64) -> Result<Box<dyn ObjectWrite>, GcsError> {
        let (info, _) = self
            .get(name)
            .filter(|(i, _)| i.generation == generation)
            .ok_or_else(|| missing(name))?;
        if info.finalized {
            return Err(GcsError::PreconditionFailed(format!(
                "mem://{name} is finalized"
            )));
        }
        Ok(Box::new(MemWriter {
            objects: self.objects.clone(),
            name: name.to_string(),
            generation,
            persisted: info.size,
            pending: Vec::new(),
        }))
    }

    async fn delete(&self, name: &str, generation: Option<i64>) -> Result<(), GcsError> {
        let mut objects = crate::sync::write(&self.objects);
        match objects.get(name) {
            Some((i, _)) if generation.is_none_or(|g| g == i.generation) => {
                objects.remove(name);
                Ok(())
            }
            _ => Err(missing(name)),
        }
    }

    async fn rename(
        &self,
        from: &str,
        to: &str,
        if_generation_match: Option<i64>,
    ) -> Result<ObjectInfo, GcsError> {
        let mut objects = crate::sync::write(&self.objects);
        let live = objects.get(to).map_or(0, |(i, _)| i.generation);
        if if_generation_match.is_some_and(|g| g != live) {
            return Err(GcsError::PreconditionFailed(format!(
                "mem://{to}: if_generation_match"
            )));
        }
        let (mut info, data) = objects.remove(from).ok_or_else(|| missing(from))?;
        info.name = to.to_string();
        objects.insert(to.to_string(), (info.clone(), data));
        Ok(info)
    }

    async fn create_folder(&self, path: &str) -> Result<(), GcsError> {
        let mut folders = crate::sync::write(&self.folders);
        let path = path.trim_end_matches('/');
        for (i, _) in path.match_indices('/').chain([(path.len(), "")]) {
            folders.insert(format!("{}/", &path[..i]));
        }
        Ok(())
    }

    async fn folder_exists(&self, path: &str) -> Result<bool, GcsError> {
        let dir = format!("{}/", path.trim_end_matches('/'));
        Ok(crate::sync::read(&self.folders).contains(&dir))
    }

    async fn delete_folder(&self, path: &str) -> Result<(), GcsError> {
        let dir = format!("{}/", path.trim_end_matches('/'));
        let busy = crate::sync::read(&self.objects)
            .keys()
            .any(|n| n.starts_with(&dir))
            || crate::sync::read(&self.folders)
                .iter()
                .any(|f| f.len() > dir.len() && f.starts_with(&dir));
        if busy {
            return Err(GcsError::PreconditionFailed(format!(
                "mem://{dir} is not empty"
            )));
        }
        if !crate::sync::write(&self.folders).remove(&dir) {
            return Err(missing(&dir));
        }
        Ok(())
    }

    async fn rename_folder(&self, from: &str, to: &str) -> Result<(), GcsError> {
        let (from, to) = (
            format!("{}/", from.trim_end_matches('/')),
            format!("{}/", to.trim_end_matches('/')),
        );
        let mut objects = crate::sync::write(&self.objects);
        let mut folders = crate::sync::write(&self.folders);
        let names: Vec<String> = objects
            .keys()
            .filter(|n| n.starts_with(&from))
            .cloned()
            .collect();
        let dirs: Vec<String> = folders
            .iter()
            .filter(|f| f.starts_with(&from))
            .cloned()
            .collect();
        if names.is_empty() && dirs.is_empty() {
            return Err(missing(&from));
        }
        for n in names {
            if let Some((mut info, data)) = objects.remove(&n) {
                info.name = format!("{to}{}", &n[from.len()..]);
                objects.insert(info.name.clone(), (info, data));
            }
        }
        for d in dirs {
            folders.remove(&d);
            folders.insert(format!("{to}{}", &d[from.len()..]));
        }
        Ok(())
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
