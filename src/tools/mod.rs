//! The command-line tools on top of the client: `zonalfs cat`, `ls` and `stat`
//! here; `cp`, `append`, `rm` and `mv` in [`write`].
//!
//! `cat` pins the object's generation, splits the requested span into windows,
//! keeps several in flight through the shared MRD pool (so they spread over the
//! object's streams) and writes them to stdout in order: it is also the raw-client
//! ceiling the mount is measured against.

pub mod write;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use crate::gcs::pool::streams_for_size;
use crate::gcs::{GcsClient, GcsError, MrdPool, ObjectId, ObjectInfo, VecSink};

/// Parses `gs://BUCKET[/OBJECT]` into the bucket and the (possibly empty) rest.
pub fn parse_gs_url(url: &str) -> Result<(String, String), GcsError> {
    let rest = url.strip_prefix("gs://").ok_or_else(|| {
        GcsError::InvalidArgument(format!("'{url}' is not a gs://BUCKET/OBJECT URL"))
    })?;
    let (bucket, object) = rest.split_once('/').unwrap_or((rest, ""));
    if !crate::names::valid_bucket_name(bucket) {
        return Err(GcsError::InvalidArgument(format!(
            "'{url}': '{bucket}' is not a valid bucket name"
        )));
    }
    Ok((bucket.to_string(), object.to_string()))
}

/// What `cat` reads and how.
#[derive(Debug, Clone)]
pub struct CatOptions {
    pub offset: u64,
    /// None: to the end.
    pub length: Option<u64>,
    /// Bytes per window.
    pub window: u64,
    /// Windows in flight; None: twice the object's streams.
    pub inflight: Option<usize>,
}

/// Streams `object` to `out`; returns the bytes written.
pub async fn cat<W: tokio::io::AsyncWrite + Unpin>(
    pool: &MrdPool,
    object: &str,
    opts: &CatOptions,
    out: &mut W,
) -> Result<u64, GcsError> {
    let info = pool.open(object).await?;
    if opts.offset > info.size {
        return Err(GcsError::OutOfRange(format!(
            "gs://{}/{object}: offset {} is past the end ({} bytes)",
            pool.client().bucket(),
            opts.offset,
            info.size
        )));
    }
    let end = match opts.length {
        Some(l) => opts.offset.saturating_add(l).min(info.size),
        None => info.size,
    };
    let id = ObjectId {
        name: object.to_string(),
        generation: info.generation,
    };
    let window = opts.window.max(1);
    let inflight = opts
        .inflight
        .unwrap_or_else(|| 2 * streams_for_size(info.size))
        .max(1);
    let starts = (opts.offset..end).step_by(window as usize);
    let mut windows = futures::stream::iter(starts)
        .map(|start| {
            let (pool, id) = (pool.clone(), id.clone());
            let len = window.min(end - start);
            async move {
                let sink = VecSink::new(len as usize);
                let n = pool.read(&id, info.size, start, len, sink.clone()).await?;
                if n != len {
                    return Err(GcsError::Protocol(format!(
                        "gs://{}/{}: short read at {start}: {n} of {len} bytes",
                        pool.client().bucket(),
                        id.name
                    )));
                }
                Ok::<_, GcsError>(sink.take())
            }
        })
        .buffered(inflight);
    let mut written = 0u64;
    while let Some(buf) = windows.try_next().await? {
        out.write_all(&buf)
            .await
            .map_err(|e| GcsError::Other(format!("writing output: {e}")))?;
        written += buf.len() as u64;
    }
    out.flush()
        .await
        .map_err(|e| GcsError::Other(format!("writing output: {e}")))?;
    Ok(written)
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// `zonalfs ls`: one line per prefix and object, like `gcloud storage ls [-l]`.
pub async fn ls(client: &GcsClient, prefix: &str, long: bool) -> Result<Vec<String>, GcsError> {
    let mut lines = Vec::new();
    let mut token = None;
    let bucket = client.bucket().to_string();
    loop {
        let page = client.list(prefix, token).await?;
        for o in &page.objects {
            lines.push(if long {
                format!(
                    "{:>12}  {}  gs://{bucket}/{}",
                    o.size,
                    rfc3339(o.update_time),
                    o.name
                )
            } else {
                format!("gs://{bucket}/{}", o.name)
            });
        }
        for p in &page.prefixes {
            lines.push(if long {
                format!("{:>12}  {:20}  gs://{bucket}/{p}", "", "")
            } else {
                format!("gs://{bucket}/{p}")
            });
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return Ok(lines),
        }
    }
}

/// `zonalfs stat`: the object's metadata, one `key: value` per line.
pub fn describe(bucket: &str, o: &ObjectInfo) -> String {
    format!(
        "url: gs://{bucket}/{}\nsize: {}\ngeneration: {}\nmetageneration: {}\nfinalized: {}\nupdated: {}\ncreated: {}\ncrc32c: {}\n",
        o.name,
        o.size,
        o.generation,
        o.metageneration,
        o.finalized,
        rfc3339(o.update_time),
        rfc3339(o.create_time),
        o.crc32c.map_or_else(|| "-".to_string(), |c| format!("{c:08x}")),
    )
}

/// Shares a pool built from the client for one command.
pub fn pool(client: GcsClient, cfg: crate::gcs::PoolConfig) -> Arc<MrdPool> {
    Arc::new(MrdPool::new(client, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn gs_urls() {
        assert_eq!(
            parse_gs_url("gs://my-bucket/a/b").unwrap(),
            ("my-bucket".into(), "a/b".into())
        );
        assert_eq!(
            parse_gs_url("gs://my-bucket").unwrap(),
            ("my-bucket".into(), String::new())
        );
        assert!(parse_gs_url("s3://x/y").is_err());
        assert!(parse_gs_url("gs://Bad/y").is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40Z");
    }
}
