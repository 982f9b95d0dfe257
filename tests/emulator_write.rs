//! The emulator's write side over the raw wire protocol, as the real service
//! behaves: BidiWriteObject (create appendable, data with offsets and CRC32C,
//! flush and state lookup, takeover, finalize with the whole object's CRC32C,
//! preconditions and the errors the service gives), DeleteObject, MoveObject,
//! the folder calls and the operation a folder rename returns.

mod common;

use bytes::Bytes;
use common::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use zonalfs::proto::storage::bidi_write_object_request::{Data, FirstMessage};
use zonalfs::proto::storage::bidi_write_object_response::WriteStatus;
use zonalfs::proto::storage::storage_client::StorageClient;
use zonalfs::proto::storage::{
    AppendObjectSpec, BidiWriteObjectRequest, BidiWriteObjectResponse, ChecksummedData,
    DeleteObjectRequest, GetObjectRequest, MoveObjectRequest, Object, ObjectChecksums,
    WriteObjectSpec,
};
use zonalfs::proto::{control, longrunning};

/// An open write stream.
struct Writer {
    tx: mpsc::Sender<BidiWriteObjectRequest>,
    rx: tonic::Streaming<BidiWriteObjectResponse>,
    /// The answer to the first message.
    opened: BidiWriteObjectResponse,
}

fn create_spec(object: &str, if_generation_match: Option<i64>) -> FirstMessage {
    FirstMessage::WriteObjectSpec(WriteObjectSpec {
        resource: Some(Object {
            name: object.to_string(),
            bucket: bucket_resource(BUCKET),
            ..Default::default()
        }),
        if_generation_match,
        appendable: Some(true),
        ..Default::default()
    })
}

fn append_spec(object: &str, generation: i64) -> FirstMessage {
    FirstMessage::AppendObjectSpec(AppendObjectSpec {
        bucket: bucket_resource(BUCKET),
        object: object.to_string(),
        generation,
        ..Default::default()
    })
}

fn data(offset: u64, bytes: &[u8]) -> BidiWriteObjectRequest {
    BidiWriteObjectRequest {
        write_offset: offset as i64,
        data: Some(Data::ChecksummedData(ChecksummedData {
            content: Bytes::copy_from_slice(bytes),
            crc32c: Some(crc32c::crc32c(bytes)),
        })),
        ..Default::default()
    }
}

fn lookup(flush: bool) -> BidiWriteObjectRequest {
    BidiWriteObjectRequest {
        flush,
        state_lookup: true,
        ..Default::default()
    }
}

impl Writer {
    async fn open(
        client: &mut StorageClient<Channel>,
        first: FirstMessage,
    ) -> Result<Writer, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(BidiWriteObjectRequest {
            first_message: Some(first),
            ..Default::default()
        })
        .await
        .expect("queue first request");
        let mut rx = client
            .bidi_write_object(routed(ReceiverStream::new(rx), BUCKET, None))
            .await?
            .into_inner();
        let opened = rx.message().await?.expect("an answer to the open");
        Ok(Writer { tx, rx, opened })
    }

    fn generation(&self) -> i64 {
        match &self.opened.write_status {
            Some(WriteStatus::Resource(o)) => o.generation,
            other => panic!("the open answers with the object: {other:?}"),
        }
    }

    async fn send(&self, r: BidiWriteObjectRequest) {
        self.tx.send(r).await.expect("send");
    }

    /// Sends a request that must be answered and returns the answer.
    async fn ask(
        &mut self,
        r: BidiWriteObjectRequest,
    ) -> Result<BidiWriteObjectResponse, tonic::Status> {
        self.send(r).await;
        Ok(self.rx.message().await?.expect("an answer"))
    }

    async fn persisted(&mut self, flush: bool) -> i64 {
        match self
            .ask(lookup(flush))
            .await
            .expect("state lookup")
            .write_status
        {
            Some(WriteStatus::PersistedSize(n)) => n,
            other => panic!("a state lookup answers persisted_size: {other:?}"),
        }
    }

    /// The status the stream ends with after `r`.
    async fn refused(mut self, r: BidiWriteObjectRequest) -> tonic::Status {
        self.send(r).await;
        loop {
            match self.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error"),
                Err(st) => return st,
            }
        }
    }
}

async fn stat(client: &mut StorageClient<Channel>, object: &str) -> Result<Object, tonic::Status> {
    client
        .get_object(routed(
            GetObjectRequest {
                bucket: bucket_resource(BUCKET),
                object: object.to_string(),
                ..Default::default()
            },
            BUCKET,
            None,
        ))
        .await
        .map(|r| r.into_inner())
}

/// The life of an appendable object: created empty and visible, readers see
/// only what was persisted, a takeover continues at the persisted size under
/// the same generation, and finalizing keeps the generation and checks the
/// whole object's CRC32C.
#[tokio::test]
async fn an_appendable_object_grows_by_flushes_and_keeps_its_generation() {
    let tree = Tree::new();
    let emu = start(&tree, Default::default()).await;
    let mut client = storage(&emu).await;
    let body = pattern(5 << 20, 3);

    let mut w = Writer::open(&mut client, create_spec("logs/a.log", Some(0)))
        .await
        .expect("create");
    let generation = w.generation();
    assert!(generation > 0);
    assert!(
        w.opened.write_handle.is_some(),
        "a write handle comes with the open"
    );
    let o = stat(&mut client, "logs/a.log")
        .await
        .expect("visible at once");
    assert_eq!(
        (o.size, o.generation, o.finalize_time),
        (0, generation, None)
    );

    w.send(data(0, &body[..2 << 20])).await;
    w.send(data(2 << 20, &body[2 << 20..3 << 20])).await;
    assert_eq!(
        w.persisted(false).await,
        0,
        "nothing persisted before a flush"
    );
    assert_eq!(stat(&mut client, "logs/a.log").await.unwrap().size, 0);
    assert_eq!(w.persisted(true).await, 3 << 20);
    assert_eq!(stat(&mut client, "logs/a.log").await.unwrap().size, 3 << 20);
    // Unflushed bytes: persisted if the server saw the writer close its side,
    // lost if it saw the stream reset (dropping both halves may do either).
    w.send(data(3 << 20, &body[3 << 20..4 << 20])).await;
    drop(w);

    // A takeover answers with the persisted size and the same generation.
    let w = Writer::open(&mut client, append_spec("logs/a.log", generation))
        .await
        .expect("take over");
    assert_eq!(w.generation(), generation);
    let size = match &w.opened.write_status {
        Some(WriteStatus::Resource(o)) => o.size,
        other => panic!("{other:?}"),
    };
    assert!(size == 3 << 20 || size == 4 << 20, "persisted: {size}");
    w.send(data(size as u64, &body[size as usize..])).await;
    let bad = ObjectChecksums {
        crc32c: Some(crc32c::crc32c(&body) ^ 1),
        md5_hash: Bytes::new(),
    };
    let st = w
        .refused(BidiWriteObjectRequest {
            finish_write: true,
            object_checksums: Some(bad),
            ..Default::default()
        })
        .await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    let o = stat(&mut client, "logs/a.log").await.unwrap();
    assert_eq!(
        o.size as usize,
        body.len(),
        "a finish persists what was sent"
    );
    assert!(
        o.finalize_time.is_none(),
        "a wrong checksum finalizes nothing"
    );

    let mut w = Writer::open(&mut client, append_spec("logs/a.log", generation))
        .await
        .expect("take over again");
    let done = w
        .ask(BidiWriteObjectRequest {
            finish_write: true,
            object_checksums: Some(ObjectChecksums {
                crc32c: Some(crc32c::crc32c(&body)),
                md5_hash: Bytes::new(),
            }),
            ..Default::default()
        })
        .await
        .expect("finalize");
    let Some(WriteStatus::Resource(o)) = done.write_status else {
        panic!("finish_write answers with the object");
    };
    assert_eq!(o.generation, generation, "finalizing keeps the generation");
    assert!(o.finalize_time.is_some());
    assert_eq!(o.size as usize, body.len());
    assert_eq!(
        o.checksums.and_then(|c| c.crc32c),
        Some(crc32c::crc32c(&body))
    );
    let o = stat(&mut client, "logs/a.log").await.unwrap();
    assert_eq!((o.generation, o.size as usize), (generation, body.len()));
    assert!(o.finalize_time.is_some());
    assert_eq!(std::fs::read(tree.path("logs/a.log")).unwrap(), body);

    // Appending to a finalized object is refused.
    let st = Writer::open(&mut client, append_spec("logs/a.log", generation))
        .await
        .err()
        .expect("refused");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
}

/// A create makes a new generation; `if_generation_match` guards it; writes
/// must continue exactly where the bytes end and carry their true CRC32C; a
/// takeover ends the earlier writer's turn; a missing object cannot be taken
/// over.
#[tokio::test]
async fn the_write_errors_the_service_gives() {
    let tree = Tree::new();
    let emu = start(&tree, Default::default()).await;
    let mut client = storage(&emu).await;

    let w = Writer::open(&mut client, create_spec("o", Some(0)))
        .await
        .expect("create");
    let first = w.generation();
    drop(w);
    let st = Writer::open(&mut client, create_spec("o", Some(0)))
        .await
        .err()
        .expect("exists");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    let w = Writer::open(&mut client, create_spec("o", Some(first)))
        .await
        .expect("replace the generation we know");
    let second = w.generation();
    assert!(second > first, "a create makes a new generation");
    assert_eq!(stat(&mut client, "o").await.unwrap().generation, second);

    let st = w.refused(data(5, b"hello")).await;
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");

    let w = Writer::open(&mut client, append_spec("o", second))
        .await
        .unwrap();
    let mut bad = data(0, b"hello");
    if let Some(Data::ChecksummedData(c)) = &mut bad.data {
        c.crc32c = Some(c.crc32c.unwrap() ^ 0x10);
    }
    let st = w.refused(bad).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

    // Two writers: the second takes over; the first can no longer persist.
    let mut a = Writer::open(&mut client, append_spec("o", second))
        .await
        .unwrap();
    a.send(data(0, b"aaaa")).await;
    assert_eq!(a.persisted(true).await, 4);
    let mut b = Writer::open(&mut client, append_spec("o", 0))
        .await
        .unwrap();
    b.send(data(4, b"bbbb")).await;
    assert_eq!(b.persisted(true).await, 8);
    a.send(data(4, b"AAAA")).await;
    let st = a.refused(lookup(true)).await;
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert_eq!(std::fs::read(tree.path("o")).unwrap(), b"aaaabbbb");

    let st = Writer::open(&mut client, append_spec("missing", 0))
        .await
        .err()
        .expect("missing");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    let st = Writer::open(&mut client, append_spec("o", second + 1))
        .await
        .err()
        .expect("another generation");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
}

/// DeleteObject and MoveObject with their preconditions; a moved object keeps
/// its generation and stays appendable.
#[tokio::test]
async fn delete_and_move() {
    let tree = Tree::new();
    let emu = start(&tree, Default::default()).await;
    let mut client = storage(&emu).await;
    let mut w = Writer::open(&mut client, create_spec("d/a", None))
        .await
        .unwrap();
    w.send(data(0, b"appendable")).await;
    assert_eq!(w.persisted(true).await, 10);
    let generation = w.generation();
    drop(w);
    tree.put("d/b", b"plain");

    let mv = |src: &str, dst: &str, if_generation_match: Option<i64>| {
        routed(
            MoveObjectRequest {
                bucket: bucket_resource(BUCKET),
                source_object: src.to_string(),
                destination_object: dst.to_string(),
                if_generation_match,
                ..Default::default()
            },
            BUCKET,
            None,
        )
    };
    let st = client
        .move_object(mv("d/a", "d/b", Some(0)))
        .await
        .unwrap_err();
    assert_eq!(
        st.code(),
        Code::FailedPrecondition,
        "the destination exists"
    );
    let o = client
        .move_object(mv("d/a", "e/c", Some(0)))
        .await
        .expect("move")
        .into_inner();
    assert_eq!(
        (o.name.as_str(), o.generation, o.size),
        ("e/c", generation, 10)
    );
    assert!(o.finalize_time.is_none(), "still appendable");
    assert_eq!(
        stat(&mut client, "d/a").await.unwrap_err().code(),
        Code::NotFound
    );
    let mut w = Writer::open(&mut client, append_spec("e/c", generation))
        .await
        .expect("append to the moved object");
    w.send(data(10, b"!")).await;
    assert_eq!(w.persisted(true).await, 11);
    drop(w);

    let del = |object: &str, if_generation_match: Option<i64>| {
        routed(
            DeleteObjectRequest {
                bucket: bucket_resource(BUCKET),
                object: object.to_string(),
                if_generation_match,
                ..Default::default()
            },
            BUCKET,
            None,
        )
    };
    let st = client
        .delete_object(del("e/c", Some(generation + 1)))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    client
        .delete_object(del("e/c", Some(generation)))
        .await
        .expect("delete");
    assert_eq!(
        stat(&mut client, "e/c").await.unwrap_err().code(),
        Code::NotFound
    );
    let st = client.delete_object(del("e/c", None)).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert!(!tree
        .root()
        .join(zonalfs::emulator::store::APPENDABLE_DIR)
        .join(BUCKET)
        .join("e/c")
        .exists());
}

/// Folders: create (recursive or not), get, delete only when empty, rename
/// with everything below it, through an operation that is done and can be
/// looked up again.
#[tokio::test]
async fn folders_and_their_rename_operation() {
    use prost::Message;
    let tree = Tree::new();
    let emu = start(&tree, Default::default()).await;
    let mut ctl = control(&emu).await;
    let mut client = storage(&emu).await;
    let folder = |p: &str| format!("projects/_/buckets/{BUCKET}/folders/{p}");
    let create = |id: &str, recursive: bool| control::CreateFolderRequest {
        parent: bucket_resource(BUCKET),
        folder_id: id.to_string(),
        recursive,
        ..Default::default()
    };
    let st = ctl.create_folder(create("x/y", false)).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "no parent: {st:?}");
    let f = ctl
        .create_folder(create("x/y", true))
        .await
        .expect("recursive")
        .into_inner();
    assert_eq!(f.name, folder("x/y/"));
    let st = ctl.create_folder(create("x/y/", false)).await.unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists);
    let got = ctl
        .get_folder(control::GetFolderRequest {
            name: folder("x/"),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.name, folder("x/"));

    let mut w = Writer::open(&mut client, create_spec("x/y/f", None))
        .await
        .unwrap();
    w.send(data(0, b"inside")).await;
    assert_eq!(w.persisted(true).await, 6);
    let generation = w.generation();
    drop(w);
    let st = ctl
        .delete_folder(control::DeleteFolderRequest {
            name: folder("x/y/"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "not empty: {st:?}");

    let op = ctl
        .rename_folder(control::RenameFolderRequest {
            name: folder("x/"),
            destination_folder_id: "z/w/".to_string(),
            ..Default::default()
        })
        .await
        .expect("rename")
        .into_inner();
    assert!(op.done);
    let Some(longrunning::operation::Result::Response(any)) = &op.result else {
        panic!("a done rename carries the folder: {op:?}");
    };
    let renamed = control::Folder::decode(any.value.as_ref()).expect("a Folder");
    assert_eq!(renamed.name, folder("z/w/"));
    let o = stat(&mut client, "z/w/y/f")
        .await
        .expect("moved with its folder");
    assert_eq!((o.generation, o.size), (generation, 6));
    assert!(o.finalize_time.is_none(), "its marker moved too");
    assert_eq!(
        stat(&mut client, "x/y/f").await.unwrap_err().code(),
        Code::NotFound
    );

    let mut ops = longrunning::operations_client::OperationsClient::new(channel(&emu).await);
    let again = ops
        .get_operation(longrunning::GetOperationRequest {
            name: op.name.clone(),
        })
        .await
        .expect("the operation can be looked up")
        .into_inner();
    assert_eq!(again, op);

    client
        .delete_object(routed(
            DeleteObjectRequest {
                bucket: bucket_resource(BUCKET),
                object: "z/w/y/f".to_string(),
                ..Default::default()
            },
            BUCKET,
            None,
        ))
        .await
        .expect("delete the object");
    ctl.delete_folder(control::DeleteFolderRequest {
        name: folder("z/w/y/"),
        ..Default::default()
    })
    .await
    .expect("an empty folder is deleted");
    assert!(!tree.path("z/w/y").exists());
}
