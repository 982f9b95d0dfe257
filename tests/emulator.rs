//! The emulator against a raw tonic client: every rule of the read protocol (docs/emulator.md)
//! that the emulator must honour, and each shaping/fault flag.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use prost::Message;
use tonic::Code;
use zonalfs::emulator::{Config, Shaping};
use zonalfs::proto::storage::{
    BidiReadHandle, BidiReadObjectError, BidiReadObjectRedirectedError, GetBucketRequest,
    GetObjectRequest, ListObjectsRequest, ReadObjectRequest,
};
use zonalfs::proto::{control, RpcStatus};

const MIB: usize = 1 << 20;

/// What a stream delivered, checked chunk by chunk.
#[derive(Default, Debug)]
struct Got {
    /// Bytes per read_id, in order.
    data: HashMap<i64, Vec<u8>>,
    /// Ranges that saw range_end.
    ended: Vec<i64>,
    /// read_id of every chunk in arrival order.
    order: Vec<i64>,
    /// CRC mismatches seen.
    bad_crc: usize,
}

/// Reads responses until every range in `starts` ended (or the stream ended or
/// failed), checking offsets are contiguous from each range's start, chunks are
/// at most 2 MiB, and CRC32C of each chunk.
async fn collect(bidi: &mut Bidi, starts: &[(i64, u64)]) -> (Got, Option<tonic::Status>) {
    let mut got = Got::default();
    let mut next: HashMap<i64, u64> = starts.iter().copied().collect();
    while got.ended.len() < starts.len() {
        let msg = match bidi.rx.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return (got, None),
            Err(st) => return (got, Some(st)),
        };
        for d in msg.object_data_ranges {
            let rr = d.read_range.expect("read_range on every chunk");
            let cd = d.checksummed_data.expect("checksummed_data");
            assert!(cd.content.len() <= 2 * MIB, "chunk over 2 MiB");
            assert_eq!(rr.read_length as usize, cd.content.len(), "chunk length");
            let want = next.get_mut(&rr.read_id).expect("known read_id");
            assert_eq!(
                rr.read_offset as u64, *want,
                "chunk offset for id {}",
                rr.read_id
            );
            *want += cd.content.len() as u64;
            if cd.crc32c != Some(crc32c::crc32c(&cd.content)) {
                got.bad_crc += 1;
            }
            got.order.push(rr.read_id);
            got.data
                .entry(rr.read_id)
                .or_default()
                .extend_from_slice(&cd.content);
            if d.range_end {
                assert!(!got.ended.contains(&rr.read_id), "range_end twice");
                got.ended.push(rr.read_id);
            }
        }
    }
    (got, None)
}

/// Opens a stream on `object`, reads it whole as read_id 1, checking every chunk.
async fn whole_object(
    emu: &zonalfs::emulator::Running,
    object: &str,
) -> (Got, Option<tonic::Status>) {
    let mut c = storage(emu).await;
    let mut b = Bidi::open(&mut c, spec(object), vec![range(1, 0, 0)], None)
        .await
        .expect("open");
    b.rx.message().await.expect("first").expect("md");
    collect(&mut b, &[(1, 0)]).await
}

fn status_details(st: &tonic::Status) -> RpcStatus {
    RpcStatus::decode(st.details()).expect("grpc-status-details-bin is a google.rpc.Status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_layout_and_errors() {
    let tree = Tree::new();
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let b = c
        .get_bucket(routed(
            GetBucketRequest {
                name: bucket_resource(BUCKET),
                ..Default::default()
            },
            BUCKET,
            None,
        ))
        .await
        .expect("get bucket")
        .into_inner();
    assert_eq!(b.location_type, "zone");
    assert_eq!(b.storage_class, "RAPID");
    assert!(b.hierarchical_namespace.expect("hns").enabled);

    let missing = c
        .get_bucket(routed(
            GetBucketRequest {
                name: bucket_resource("no-such-bucket"),
                ..Default::default()
            },
            "no-such-bucket",
            None,
        ))
        .await
        .expect_err("missing bucket");
    assert_eq!(missing.code(), Code::NotFound);
    let bad = c
        .get_bucket(GetBucketRequest {
            name: "buckets/Bad_Name".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(bad.code(), Code::InvalidArgument);
    // The routing header must name the bucket of the request.
    let wrong = c
        .get_bucket(routed(
            GetBucketRequest {
                name: bucket_resource(BUCKET),
                ..Default::default()
            },
            "other-bucket",
            None,
        ))
        .await
        .expect_err("header for another bucket");
    assert_eq!(wrong.code(), Code::InvalidArgument);

    let mut ctl = control(&emu).await;
    let layout = ctl
        .get_storage_layout(routed(
            control::GetStorageLayoutRequest {
                name: format!("{}/storageLayout", bucket_resource(BUCKET)),
                ..Default::default()
            },
            BUCKET,
            None,
        ))
        .await
        .expect("layout")
        .into_inner();
    assert_eq!(layout.location_type, "zone");
    assert!(layout.hierarchical_namespace.expect("hns").enabled);
    let err = ctl
        .get_storage_layout(control::GetStorageLayoutRequest {
            name: format!("{}/storageLayout", bucket_resource("absent-bucket")),
            ..Default::default()
        })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_object_metadata_and_generations() {
    let tree = Tree::new();
    let data = tree.put("a/b.bin", &pattern(3 * MIB + 5, 1));
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let get = |object: &str, generation: i64| GetObjectRequest {
        bucket: bucket_resource(BUCKET),
        object: object.into(),
        generation,
        ..Default::default()
    };
    let o = c
        .get_object(get("a/b.bin", 0))
        .await
        .expect("stat")
        .into_inner();
    assert_eq!(o.size as usize, data.len());
    assert!(o.generation > 0);
    assert_eq!(o.metageneration, 1);
    assert!(o.finalize_time.is_some());
    assert_eq!(
        o.checksums.expect("checksums").crc32c,
        Some(crc32c::crc32c(&data))
    );
    // Same version: same generation; the generation pins.
    let again = c
        .get_object(get("a/b.bin", o.generation))
        .await
        .expect("pinned");
    assert_eq!(again.into_inner().generation, o.generation);
    // Replace the file: new generation, the old one is gone.
    std::fs::remove_file(tree.path("a/b.bin")).expect("rm");
    tree.put("a/b.bin", b"v2");
    let n = c
        .get_object(get("a/b.bin", 0))
        .await
        .expect("stat v2")
        .into_inner();
    assert_ne!(n.generation, o.generation);
    assert_eq!(n.size, 2);
    let gone = c
        .get_object(get("a/b.bin", o.generation))
        .await
        .expect_err("old gen");
    assert_eq!(gone.code(), Code::NotFound);

    for (name, code) in [
        ("missing", Code::NotFound),
        ("a", Code::NotFound), // a directory is not an object
        ("../etc/passwd", Code::NotFound),
        ("", Code::InvalidArgument),
        ("x\ny", Code::InvalidArgument),
    ] {
        let e = c.get_object(get(name, 0)).await.expect_err(name);
        assert_eq!(e.code(), code, "{name:?}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_objects_prefixes_folders_bounds() {
    let tree = Tree::new();
    for n in ["a.txt", "a/b", "a/c/d", "a0", "b", "x/y/z"] {
        tree.put(n, n.as_bytes());
    }
    std::fs::create_dir_all(tree.path("empty-folder")).expect("mkdir");
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let list = |c: &mut zonalfs::proto::storage::storage_client::StorageClient<_>,
                req: ListObjectsRequest| {
        let mut c = c.clone();
        async move {
            let (mut objects, mut prefixes) = (vec![], vec![]);
            let mut req = req;
            for _ in 0..10_000 {
                let r = c
                    .list_objects(routed(req.clone(), BUCKET, None))
                    .await
                    .expect("list")
                    .into_inner();
                objects.extend(r.objects.into_iter().map(|o| o.name));
                prefixes.extend(r.prefixes);
                if r.next_page_token.is_empty() {
                    return (objects, prefixes);
                }
                req.page_token = r.next_page_token;
            }
            panic!("listing never ended");
        }
    };
    let base = ListObjectsRequest {
        parent: bucket_resource(BUCKET),
        ..Default::default()
    };
    let (o, p) = list(&mut c, base.clone()).await;
    assert_eq!(o, ["a.txt", "a/b", "a/c/d", "a0", "b", "x/y/z"]);
    assert!(p.is_empty());
    for page_size in [1, 2, 1000] {
        let (o, p) = list(
            &mut c,
            ListObjectsRequest {
                delimiter: "/".into(),
                page_size,
                ..base.clone()
            },
        )
        .await;
        assert_eq!(o, ["a.txt", "a0", "b"]);
        assert_eq!(p, ["a/", "x/"]);
    }
    let (_, p) = list(
        &mut c,
        ListObjectsRequest {
            delimiter: "/".into(),
            include_folders_as_prefixes: true,
            ..base.clone()
        },
    )
    .await;
    assert_eq!(p, ["a/", "empty-folder/", "x/"]);
    let (o, p) = list(
        &mut c,
        ListObjectsRequest {
            delimiter: "/".into(),
            prefix: "a/".into(),
            include_trailing_delimiter: true,
            ..base.clone()
        },
    )
    .await;
    assert_eq!((o, p), (vec!["a/b".to_string()], vec!["a/c/".to_string()]));
    let (o, _) = list(
        &mut c,
        ListObjectsRequest {
            lexicographic_start: "a/c".into(),
            lexicographic_end: "b".into(),
            page_size: 1,
            ..base.clone()
        },
    )
    .await;
    assert_eq!(o, ["a/c/d", "a0"]);
    let bad = c
        .list_objects(ListObjectsRequest {
            page_token: "not-a-token".into(),
            ..base.clone()
        })
        .await
        .expect_err("bad token");
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_100k_objects_in_pages() {
    let tree = Tree::new();
    let dir = tree.path("many");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let n = 100_000;
    for i in 0..n {
        std::fs::File::create(dir.join(format!("f{i:06}"))).expect("create");
    }
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let mut req = ListObjectsRequest {
        parent: bucket_resource(BUCKET),
        prefix: "many/".into(),
        delimiter: "/".into(),
        ..Default::default()
    };
    let mut names = Vec::with_capacity(n);
    let mut pages = 0;
    loop {
        let r = c
            .list_objects(routed(req.clone(), BUCKET, None))
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        assert!(r.objects.len() <= 1000);
        names.extend(r.objects.into_iter().map(|o| o.name));
        if r.next_page_token.is_empty() {
            break;
        }
        assert!(pages <= n / 1000, "too many pages");
        req.page_token = r.next_page_token;
    }
    assert_eq!(names.len(), n);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    assert_eq!(names[0], "many/f000000");
    assert_eq!(names[n - 1], format!("many/f{:06}", n - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_object_ranges() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(5 * MIB + 3, 2));
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let size = data.len() as i64;
    for (off, limit, want) in [
        (0, 0, &data[..]),
        (7, 100, &data[7..107]),
        (-10, 0, &data[data.len() - 10..]),
        (size - 5, 100, &data[data.len() - 5..]),
        (size, 0, &data[data.len()..]),
    ] {
        let mut s = c
            .read_object(routed(
                ReadObjectRequest {
                    bucket: bucket_resource(BUCKET),
                    object: "obj".into(),
                    read_offset: off,
                    read_limit: limit,
                    ..Default::default()
                },
                BUCKET,
                None,
            ))
            .await
            .expect("read")
            .into_inner();
        let mut got = Vec::new();
        let mut first = true;
        while let Some(m) = s.message().await.expect("chunk") {
            if first {
                assert!(m.metadata.is_some() && m.content_range.is_some());
                if off == 0 && limit == 0 {
                    let cs = m.object_checksums.clone().expect("whole-object checksums");
                    assert_eq!(cs.crc32c, Some(crc32c::crc32c(&data)));
                }
                first = false;
            }
            if let Some(cd) = m.checksummed_data {
                assert!(cd.content.len() <= 2 * MIB);
                assert_eq!(cd.crc32c, Some(crc32c::crc32c(&cd.content)));
                got.extend_from_slice(&cd.content);
            }
        }
        assert_eq!(got, want, "offset {off} limit {limit}");
    }
    let e = c
        .read_object(ReadObjectRequest {
            bucket: bucket_resource(BUCKET),
            object: "obj".into(),
            read_offset: size + 1,
            ..Default::default()
        })
        .await
        .expect_err("past the end");
    assert_eq!(e.code(), Code::OutOfRange);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_first_response_without_ranges() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(1000, 3));
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(&mut c, spec("obj"), vec![], None)
        .await
        .expect("open");
    let first = b.rx.message().await.expect("first").expect("a response");
    let md = first.metadata.expect("metadata at once");
    assert_eq!(md.size as usize, data.len());
    assert!(md.generation > 0 && md.finalize_time.is_some());
    assert_eq!(
        md.checksums.expect("crc").crc32c,
        Some(crc32c::crc32c(&data))
    );
    assert!(!first.read_handle.expect("handle").handle.is_empty());
    assert!(first.object_data_ranges.is_empty());
    // Ranges added later are served on the same stream.
    b.add(vec![range(9, 10, 20)]).await;
    let (got, err) = collect(&mut b, &[(9, 10)]).await;
    assert!(err.is_none());
    assert_eq!(got.data[&9], &data[10..30]);
    // Half-close: the server ends the stream with OK.
    drop(b.tx);
    assert!(b.rx.message().await.expect("clean end").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_many_ranges_interleaved() {
    let tree = Tree::new();
    let data = tree.put("big", &pattern(9 * MIB + 77, 4));
    // Small chunks make interleaving visible with modest data.
    let emu = start(
        &tree,
        Config {
            shaping: Shaping {
                chunk_size: 64 << 10,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let mut c = storage(&emu).await;
    let size = data.len() as i64;
    let specs: Vec<(i64, i64, i64)> = (0..200)
        .map(|i| {
            let off = (i * 45_677) % (size - 300_000);
            (1000 + i, off, 1 + (i * 1_543) % 300_000)
        })
        .collect();
    let mut b = Bidi::open(
        &mut c,
        spec("big"),
        specs[..100]
            .iter()
            .map(|&(id, o, l)| range(id, o, l))
            .collect(),
        None,
    )
    .await
    .expect("open");
    b.add(
        specs[100..]
            .iter()
            .map(|&(id, o, l)| range(id, o, l))
            .collect(),
    )
    .await;
    b.rx.message().await.expect("first").expect("metadata");
    let starts: Vec<(i64, u64)> = specs.iter().map(|&(id, o, _)| (id, o as u64)).collect();
    let (got, err) = collect(&mut b, &starts).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.bad_crc, 0);
    for &(id, o, l) in &specs {
        assert_eq!(
            got.data[&id],
            &data[o as usize..(o + l) as usize],
            "read_id {id}"
        );
    }
    // Interleaved: some range's chunks are not all contiguous in arrival order.
    let switches = got.order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches > specs.len(),
        "ranges were served one after another"
    );
    // Whole object with read_length 0, and a negative offset.
    b.add(vec![range(1, 0, 0), range(2, -100, 0), range(3, -50, 10)])
        .await;
    let (got, err) = collect(
        &mut b,
        &[(1, 0), (2, size as u64 - 100), (3, size as u64 - 50)],
    )
    .await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.data[&1], data);
    assert_eq!(got.data[&2], &data[data.len() - 100..]);
    assert_eq!(got.data[&3], &data[data.len() - 50..data.len() - 40]);
}

/// A short range goes out in a response of its own, ahead of a long range
/// requested after it: a response ends with a range's last chunk instead of
/// filling up with the next range's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_ends_with_a_range() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(5 * MIB, 9));
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(
        &mut c,
        spec("obj"),
        vec![range(1, 0, 65_536), range(2, 65_536, 4 * MIB as i64)],
        None,
    )
    .await
    .expect("open");
    b.rx.message().await.expect("first").expect("metadata");
    let first = b.rx.message().await.expect("data").expect("a response");
    assert_eq!(first.object_data_ranges.len(), 1, "the head alone");
    let d = &first.object_data_ranges[0];
    assert!(d.range_end);
    let rr = d.read_range.as_ref().expect("read_range");
    assert_eq!((rr.read_id, rr.read_offset, rr.read_length), (1, 0, 65_536));
    let (got, err) = collect(&mut b, &[(2, 65_536)]).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.data[&2], &data[65_536..65_536 + 4 * MIB]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_empty_ranges_still_end() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(100, 5));
    tree.put("empty", b"");
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(&mut c, spec("obj"), vec![range(1, 100, 0)], None)
        .await
        .expect("open");
    b.rx.message().await.expect("first").expect("metadata");
    let (got, err) = collect(&mut b, &[(1, data.len() as u64)]).await;
    assert!(err.is_none());
    assert_eq!(got.ended, [1]);
    assert!(got.data[&1].is_empty());
    let mut b = Bidi::open(&mut c, spec("empty"), vec![range(5, 0, 0)], None)
        .await
        .expect("open empty");
    b.rx.message().await.expect("first").expect("metadata");
    let (got, _) = collect(&mut b, &[(5, 0)]).await;
    assert_eq!(got.ended, [5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_out_of_range_and_bad_requests() {
    let tree = Tree::new();
    tree.put("obj", &pattern(100, 6));
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(&mut c, spec("obj"), vec![range(77, 101, 1)], None)
        .await
        .expect("open");
    b.rx.message().await.expect("first").expect("metadata");
    let st = b.rx.message().await.expect_err("out of range");
    assert_eq!(st.code(), Code::OutOfRange);
    let rpc = status_details(&st);
    assert_eq!(rpc.code, Code::OutOfRange as i32);
    assert_eq!(rpc.message, st.message());
    let any = &rpc.details[0];
    assert_eq!(
        any.type_url,
        "type.googleapis.com/google.storage.v2.BidiReadObjectError"
    );
    let e = BidiReadObjectError::decode(any.value.as_slice()).expect("detail");
    assert_eq!(e.read_range_errors[0].read_id, 77);

    // Duplicate read_id while outstanding; negative length.
    for ranges in [
        vec![range(1, 0, 10), range(1, 10, 10)],
        vec![range(2, 0, -1)],
    ] {
        let mut b = Bidi::open(&mut c, spec("obj"), ranges, None)
            .await
            .expect("open");
        b.rx.message().await.expect("first").expect("metadata");
        let mut code = None;
        while code.is_none() {
            match b.rx.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended without error"),
                Err(st) => code = Some(st.code()),
            }
        }
        assert_eq!(code, Some(Code::InvalidArgument));
    }
    let e = Bidi::open(&mut c, spec("missing"), vec![], None)
        .await
        .err()
        .expect("missing object");
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_generation_pinning_and_handles() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(4096, 7));
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(&mut c, spec("obj"), vec![], None)
        .await
        .expect("open");
    let first = b.rx.message().await.expect("first").expect("metadata");
    let generation = first.metadata.expect("md").generation;
    let handle = first.read_handle.expect("handle");
    // Reopen with the handle only (no generation in the spec).
    let mut s = spec("obj");
    s.read_handle = Some(handle.clone());
    let mut b2 = Bidi::open(&mut c, s, vec![range(1, 0, 0)], None)
        .await
        .expect("reopen");
    let md = b2
        .rx
        .message()
        .await
        .expect("first")
        .expect("md")
        .metadata
        .expect("md");
    assert_eq!(md.generation, generation);
    let (got, _) = collect(&mut b2, &[(1, 0)]).await;
    assert_eq!(got.data[&1], data);
    // A handle for another object is refused.
    let mut s = spec("other");
    s.read_handle = Some(handle.clone());
    tree.put("other", b"x");
    let e = Bidi::open(&mut c, s, vec![], None)
        .await
        .err()
        .expect("wrong handle");
    assert_eq!(e.code(), Code::InvalidArgument);
    // Replace the object: the old generation is gone for new streams.
    std::fs::remove_file(tree.path("obj")).expect("rm");
    tree.put("obj", b"new");
    let mut s = spec("obj");
    s.generation = generation;
    let e = Bidi::open(&mut c, s, vec![], None)
        .await
        .err()
        .expect("gone");
    assert_eq!(e.code(), Code::NotFound);
    let mut s = spec("obj");
    s.read_handle = Some(handle);
    let e = Bidi::open(&mut c, s, vec![], None)
        .await
        .err()
        .expect("gone via handle");
    assert_eq!(e.code(), Code::NotFound);
    // The stream opened before the replacement still serves its generation.
    b.add(vec![range(3, 0, 0)]).await;
    let (got, err) = collect(&mut b, &[(3, 0)]).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.data[&3], data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_redirect_requires_token_and_handle() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(3 * MIB, 8));
    let emu = start(
        &tree,
        Config {
            shaping: Shaping {
                redirect_every: Some(1),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let mut c = storage(&emu).await;
    let st = Bidi::open(&mut c, spec("obj"), vec![range(1, 0, 0)], None)
        .await
        .err()
        .expect("redirected");
    assert_eq!(st.code(), Code::Aborted);
    let rpc = status_details(&st);
    assert_eq!(
        (rpc.code, rpc.message.as_str()),
        (Code::Aborted as i32, st.message())
    );
    assert_eq!(
        rpc.details[0].type_url,
        "type.googleapis.com/google.storage.v2.BidiReadObjectRedirectedError"
    );
    let redirect =
        BidiReadObjectRedirectedError::decode(rpc.details[0].value.as_slice()).expect("detail");
    let token = redirect.routing_token.expect("token");
    let handle = redirect.read_handle.expect("handle");

    // Token without handle: refused. Unknown token: refused.
    let e = Bidi::open(&mut c, spec("obj"), vec![], Some(&token))
        .await
        .err()
        .expect("no handle");
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut s = spec("obj");
    s.read_handle = Some(handle.clone());
    let e = Bidi::open(&mut c, s, vec![], Some("forged"))
        .await
        .err()
        .expect("forged");
    assert_eq!(e.code(), Code::InvalidArgument);
    // Handle + token (in the header, as the official client does): served.
    let mut s = spec("obj");
    s.read_handle = Some(handle.clone());
    let mut b = Bidi::open(&mut c, s, vec![range(1, 0, 0)], Some(&token))
        .await
        .expect("reopen");
    b.rx.message().await.expect("first").expect("md");
    let (got, _) = collect(&mut b, &[(1, 0)]).await;
    assert_eq!(got.data[&1], data);
    // Token in the spec works too.
    let mut s = spec("obj");
    s.read_handle = Some(BidiReadHandle {
        handle: handle.handle.clone(),
    });
    s.routing_token = Some(token.clone());
    assert!(Bidi::open(&mut c, s, vec![], None).await.is_ok());
    assert!(emu.emu.counters.fault_redirect.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_fail_open_break_corrupt() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(4 * MIB, 9));

    let emu = start(
        &tree,
        shaped(Shaping {
            fail_open_rate: 1.0,
            ..Default::default()
        }),
    )
    .await;
    let mut c = storage(&emu).await;
    let e = Bidi::open(&mut c, spec("obj"), vec![], None)
        .await
        .err()
        .expect("fails");
    assert_eq!(e.code(), Code::Unavailable);
    emu.stop().await.expect("stop");

    let emu = start(
        &tree,
        shaped(Shaping {
            break_after_bytes: Some(1_000_000),
            ..Default::default()
        }),
    )
    .await;
    let (got, err) = whole_object(&emu, "obj").await;
    assert_eq!(err.expect("broken").code(), Code::Unavailable);
    assert_eq!(
        got.data[&1],
        &data[..1_000_000],
        "exactly N good bytes, then the break"
    );
    assert_eq!(emu.emu.counters.fault_break.load(Ordering::Relaxed), 1);
    emu.stop().await.expect("stop");

    let emu = start(
        &tree,
        shaped(Shaping {
            corrupt_every: Some(2),
            ..Default::default()
        }),
    )
    .await;
    let (got, _) = whole_object(&emu, "obj").await;
    assert_eq!(got.bad_crc, 1, "2 chunks, the 2nd corrupted");
    assert_ne!(got.data[&1], data);
    assert_eq!(emu.emu.counters.fault_corrupt.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_stall_keeps_stream_open() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(MIB, 10));
    let emu = start(
        &tree,
        Config {
            shaping: Shaping {
                stall_after_bytes: Some(300_000),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(&mut c, spec("obj"), vec![range(1, 0, 0)], None)
        .await
        .expect("open");
    b.rx.message().await.expect("first").expect("md");
    let m = b.rx.message().await.expect("data").expect("a chunk");
    let cd = m.object_data_ranges[0]
        .checksummed_data
        .clone()
        .expect("data");
    assert_eq!(cd.content, &data[..300_000]);
    // Wait (bounded) for the server to enter the stall, then check it sends nothing
    // more and has not closed the stream.
    assert!(
        wait_until_async(Duration::from_secs(30), || {
            emu.emu.counters.fault_stall.load(Ordering::Relaxed) != 0
        })
        .await,
        "stall never reached"
    );
    use futures::FutureExt;
    assert!(
        b.rx.message().now_or_never().is_none(),
        "stalled stream sent or ended"
    );
    assert_eq!(
        emu.emu.counters.bytes_served.load(Ordering::Relaxed),
        300_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaping_latency_and_bandwidth_are_lower_bounds() {
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(16 * MIB, 11));
    let emu = start(
        &tree,
        Config {
            shaping: Shaping {
                latency: Duration::from_millis(50),
                stream_bytes_per_sec: Some(50e6),
                chunk_size: MIB,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(&mut c, spec("obj"), vec![], None)
        .await
        .expect("open");
    b.rx.message().await.expect("first").expect("md");
    let t0 = Instant::now();
    b.add(vec![range(1, 0, 0)]).await;
    let (got, _) = collect(&mut b, &[(1, 0)]).await;
    // 50 ms latency, then 16 MiB at 50 MB/s (335 ms) less the pacing credit
    // (50 ms) and the first chunk (21 ms): the server guarantees at least this
    // much, however fast the machine.
    let floor = Duration::from_millis(50 + 335 - 50 - 21);
    assert!(t0.elapsed() >= floor, "{:?} < {floor:?}", t0.elapsed());
    assert_eq!(got.data[&1], data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appendable_objects_grow() {
    let tree = Tree::new();
    tree.put("log", &pattern(1000, 12));
    tree.mark_appendable("log");
    let emu = start(&tree, Config::default()).await;
    let mut c = storage(&emu).await;
    let mut b = Bidi::open(&mut c, spec("log"), vec![], None)
        .await
        .expect("open");
    let md =
        b.rx.message()
            .await
            .expect("first")
            .expect("md")
            .metadata
            .expect("md");
    assert_eq!(md.size, 1000);
    assert!(md.finalize_time.is_none(), "unfinalized");
    // Append: the same stream reads to the new end; the generation holds.
    let more = pattern(5000, 13);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(tree.path("log"))
            .expect("open for append");
        f.write_all(&more).expect("append");
    }
    b.add(vec![range(1, 1000, 0)]).await;
    let (got, _) = collect(&mut b, &[(1, 1000)]).await;
    assert_eq!(got.data[&1], more);
    let o = c
        .get_object(GetObjectRequest {
            bucket: bucket_resource(BUCKET),
            object: "log".into(),
            ..Default::default()
        })
        .await
        .expect("stat")
        .into_inner();
    assert_eq!((o.size, o.generation), (6000, md.generation));
    assert!(o.finalize_time.is_none());
}
