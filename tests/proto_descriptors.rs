//! Wire compatibility of `proto/` with the real service, checked against
//! descriptors nobody here wrote.
//!
//! build.rs writes the descriptors it compiles from `proto/` to
//! `$OUT_DIR/zonalfs_descriptors.bin`; tests/python/descriptors.py dumps the
//! official ones from the generated types of the pinned official Python packages
//! (tests/python/requirements.txt, in the venv of tests/common/python.rs). Every
//! message and enum we declare, in every package, present and future, is looked
//! up by full name and each of its fields compared with the official field of
//! the same number: name, type (with the message or enum type name), label and
//! explicit presence (`optional`), oneof membership. Anything we declare that has
//! no official counterpart is a difference too. A failure lists every difference.
//!
//! The last test decodes a `Bucket` hand-encoded as the real service sends it,
//! with `logging` (field 18) set: the bug of issue 11 was `update_time = 18`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};

use common::python::python;

/// What build.rs compiled from `proto/`.
const OURS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/zonalfs_descriptors.bin"));

/// Packages compiled in from protox's own copies, not declared by us.
const NOT_OURS: &[&str] = &["google.protobuf"];

fn ours() -> FileDescriptorSet {
    FileDescriptorSet::decode(OURS).expect("descriptors written by build.rs")
}

/// The official descriptors, dumped by tests/python/descriptors.py in the venv.
fn official() -> FileDescriptorSet {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("official.bin");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/descriptors.py");
    let run = Command::new(python())
        .arg(&script)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run descriptors.py");
    assert!(
        run.status.success(),
        "descriptors.py failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&out).expect("descriptors.py output");
    FileDescriptorSet::decode(bytes.as_slice()).expect("a FileDescriptorSet")
}

/// Every message and enum of a descriptor set, by full name (`.pkg.Outer.Inner`).
#[derive(Default)]
struct Index<'a> {
    messages: BTreeMap<String, &'a DescriptorProto>,
    enums: BTreeMap<String, &'a EnumDescriptorProto>,
}

impl<'a> Index<'a> {
    /// Indexes the files of `set`, leaving out the packages in `skip`.
    fn new(set: &'a FileDescriptorSet, skip: &[&str]) -> Index<'a> {
        let mut index = Index::default();
        for file in &set.file {
            if skip.contains(&file.package()) {
                continue;
            }
            let scope = format!(".{}", file.package());
            index.add(&scope, &file.message_type, &file.enum_type);
        }
        index
    }

    fn add(
        &mut self,
        scope: &str,
        messages: &'a [DescriptorProto],
        enums: &'a [EnumDescriptorProto],
    ) {
        for e in enums {
            self.enums.insert(format!("{scope}.{}", e.name()), e);
        }
        for m in messages {
            let name = format!("{scope}.{}", m.name());
            self.add(&name, &m.nested_type, &m.enum_type);
            self.messages.insert(name, m);
        }
    }
}

/// A field as it would be declared, e.g. `optional int64 generation = 3`,
/// `repeated .google.storage.v2.Object objects = 1`, `oneof data: bytes x = 4`.
fn describe(message: &DescriptorProto, f: &FieldDescriptorProto) -> String {
    let mut s = String::new();
    if let (Some(i), false) = (f.oneof_index, f.proto3_optional()) {
        let oneof = usize::try_from(i)
            .ok()
            .and_then(|i| message.oneof_decl.get(i))
            .map_or("?", |o| o.name());
        s.push_str(&format!("oneof {oneof}: "));
    }
    match f.label() {
        Label::Repeated => s.push_str("repeated "),
        Label::Required => s.push_str("required "),
        Label::Optional if f.proto3_optional() => s.push_str("optional "),
        Label::Optional => {}
    }
    match f.r#type() {
        Type::Message | Type::Enum | Type::Group => s.push_str(f.type_name()),
        t => s.push_str(&t.as_str_name().trim_start_matches("TYPE_").to_lowercase()),
    }
    s.push_str(&format!(" {} = {}", f.name(), f.number()));
    s
}

fn is_map_entry(m: &DescriptorProto) -> bool {
    m.options
        .as_ref()
        .and_then(|o| o.map_entry)
        .unwrap_or(false)
}

/// Every difference between what we declare and the official descriptors,
/// and how many messages and fields were compared.
fn differences(
    ours: &FileDescriptorSet,
    official: &FileDescriptorSet,
) -> (Vec<String>, usize, usize) {
    let ours = Index::new(ours, NOT_OURS);
    let official = Index::new(official, &[]);
    let mut diffs = Vec::new();
    let mut fields = 0;
    for (name, ours) in &ours.messages {
        let Some(theirs) = official.messages.get(name) else {
            diffs.push(format!("message {name}: no official message has this name"));
            continue;
        };
        if is_map_entry(ours) != is_map_entry(theirs) {
            diffs.push(format!(
                "message {name}: map entry ours {}, official {}",
                is_map_entry(ours),
                is_map_entry(theirs)
            ));
        }
        for f in &ours.field {
            fields += 1;
            let mine = describe(ours, f);
            match theirs.field.iter().find(|t| t.number() == f.number()) {
                Some(t) => {
                    let official = describe(theirs, t);
                    if mine != official {
                        // Our name under another official number, as `update_time`
                        // (13) declared as 18 was.
                        let elsewhere = theirs
                            .field
                            .iter()
                            .find(|o| o.name() == f.name() && o.number() != f.number())
                            .map(|o| format!(" (official `{}`)", describe(theirs, o)))
                            .unwrap_or_default();
                        diffs.push(format!(
                            "{name}: ours `{mine}`, official `{official}`{elsewhere}"
                        ));
                    }
                }
                None => match theirs.field.iter().find(|t| t.name() == f.name()) {
                    Some(t) => diffs.push(format!(
                        "{name}: ours `{mine}`, official `{}` (another number)",
                        describe(theirs, t)
                    )),
                    None => diffs.push(format!(
                        "{name}: ours `{mine}`, no official field has this number or name"
                    )),
                },
            }
        }
    }
    for (name, ours) in &ours.enums {
        let Some(theirs) = official.enums.get(name) else {
            diffs.push(format!("enum {name}: no official enum has this name"));
            continue;
        };
        for v in &ours.value {
            match theirs.value.iter().find(|t| t.number() == v.number()) {
                Some(t) if t.name() == v.name() => {}
                Some(t) => diffs.push(format!(
                    "enum {name}: ours `{} = {}`, official `{} = {}`",
                    v.name(),
                    v.number(),
                    t.name(),
                    t.number()
                )),
                None => diffs.push(format!(
                    "enum {name}: ours `{} = {}`, no official value has this number",
                    v.name(),
                    v.number()
                )),
            }
        }
    }
    (diffs, ours.messages.len(), fields)
}

#[test]
fn every_declared_message_matches_the_official_descriptors() {
    let ours = ours();
    let official = official();
    let (diffs, messages, fields) = differences(&ours, &official);
    println!("compared {messages} messages and {fields} fields with the official descriptors");
    assert!(messages > 0 && fields > 0, "nothing compared");
    assert!(
        diffs.is_empty(),
        "{} differences between proto/ and the official descriptors:\n  {}",
        diffs.len(),
        diffs.join("\n  ")
    );
}

// The comparison itself, without Python: it must see a difference of each kind.

fn message_mut<'a>(
    set: &'a mut FileDescriptorSet,
    package: &str,
    name: &str,
) -> &'a mut DescriptorProto {
    set.file
        .iter_mut()
        .filter(|f| f.package() == package)
        .flat_map(|f| f.message_type.iter_mut())
        .find(|m| m.name() == name)
        .expect("message")
}

fn field_mut<'a>(m: &'a mut DescriptorProto, name: &str) -> &'a mut FieldDescriptorProto {
    m.field
        .iter_mut()
        .find(|f| f.name() == name)
        .expect("field")
}

#[test]
fn the_comparison_of_a_set_with_itself_finds_nothing() {
    let set = ours();
    let (diffs, messages, fields) = differences(&set, &set);
    assert_eq!(diffs, Vec::<String>::new());
    assert!(
        messages > 20 && fields > 100,
        "{messages} messages, {fields} fields"
    );
}

#[test]
fn the_comparison_reports_a_changed_number_name_type_label_or_oneof() {
    let official = ours();
    let mut changed = ours();
    let range = message_mut(&mut changed, "google.storage.v2", "ReadRange");
    field_mut(range, "read_id").number = Some(4);
    let spec = message_mut(&mut changed, "google.storage.v2", "BidiReadObjectSpec");
    field_mut(spec, "object").name = Some("object_name".into());
    field_mut(spec, "generation").r#type = Some(Type::Int32 as i32);
    let list = message_mut(&mut changed, "google.storage.v2", "ListObjectsResponse");
    field_mut(list, "prefixes").label = Some(Label::Optional as i32);
    let write = message_mut(&mut changed, "google.storage.v2", "BidiWriteObjectRequest");
    field_mut(write, "checksummed_data").oneof_index = None;
    // The bug of issue 11: `update_time` declared with `logging`'s number.
    let bucket = message_mut(&mut changed, "google.storage.v2", "Bucket");
    bucket.field.retain(|f| f.name() != "logging");
    field_mut(bucket, "update_time").number = Some(18);
    let (diffs, _, _) = differences(&changed, &official);
    assert_eq!(
        diffs,
        [
            "google.storage.v2.BidiReadObjectSpec: ours `string object_name = 2`, \
             official `string object = 2`",
            "google.storage.v2.BidiReadObjectSpec: ours `int32 generation = 3`, \
             official `int64 generation = 3`",
            "google.storage.v2.BidiWriteObjectRequest: ours \
             `.google.storage.v2.ChecksummedData checksummed_data = 4`, official \
             `oneof data: .google.storage.v2.ChecksummedData checksummed_data = 4`",
            "google.storage.v2.Bucket: ours `.google.protobuf.Timestamp update_time = 18`, \
             official `.google.storage.v2.Bucket.Logging logging = 18` \
             (official `.google.protobuf.Timestamp update_time = 13`)",
            "google.storage.v2.ListObjectsResponse: ours `string prefixes = 2`, \
             official `repeated string prefixes = 2`",
            "google.storage.v2.ReadRange: ours `int64 read_id = 4`, \
             official `int64 read_id = 3` (another number)",
        ]
        .map(|d| format!(".{d}"))
    );
}

#[test]
fn the_comparison_reports_a_message_without_official_counterpart() {
    let official = ours();
    let mut changed = ours();
    let extra = DescriptorProto {
        name: Some("NotInTheService".into()),
        ..Default::default()
    };
    message_mut(&mut changed, "google.storage.v2", "Bucket")
        .nested_type
        .push(extra);
    let (diffs, _, _) = differences(&changed, &official);
    assert_eq!(
        diffs,
        ["message .google.storage.v2.Bucket.NotInTheService: no official message has this name"]
    );
}

// A Bucket as the real service encodes it, written byte by byte.

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint field (wire type 0).
fn uint(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

/// A length-delimited field (wire type 2): a string, bytes or a message.
fn bytes(out: &mut Vec<u8>, field: u64, v: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// A google.protobuf.Timestamp (seconds = 1, nanos = 2).
fn timestamp(seconds: u64, nanos: u64) -> Vec<u8> {
    let mut t = Vec::new();
    uint(&mut t, 1, seconds);
    uint(&mut t, 2, nanos);
    t
}

fn real_bucket() -> Vec<u8> {
    let mut logging = Vec::new();
    bytes(&mut logging, 1, b"log-bucket");
    bytes(&mut logging, 2, b"logs/");
    let mut labels = Vec::new();
    bytes(&mut labels, 1, b"team");
    bytes(&mut labels, 2, b"storage");
    let mut versioning = Vec::new();
    uint(&mut versioning, 1, 1);
    let mut hns = Vec::new();
    uint(&mut hns, 1, 1);

    let mut b = Vec::new();
    bytes(&mut b, 1, b"projects/_/buckets/zonal");
    bytes(&mut b, 2, b"zonal");
    bytes(&mut b, 3, b"projects/123");
    uint(&mut b, 4, 7);
    bytes(&mut b, 5, b"US-CENTRAL1");
    bytes(&mut b, 6, b"zone");
    bytes(&mut b, 7, b"RAPID");
    bytes(&mut b, 11, &timestamp(1_700_000_000, 5));
    bytes(&mut b, 13, &timestamp(1_760_000_000, 123_000_000));
    bytes(&mut b, 15, &labels); // labels (not declared by us)
    bytes(&mut b, 17, &versioning); // versioning (not declared by us)
    bytes(&mut b, 18, &logging);
    bytes(&mut b, 29, b"CAc=");
    bytes(&mut b, 32, &hns);
    b
}

#[test]
fn a_bucket_with_logging_decodes_with_the_right_update_time() {
    use zonalfs::proto::storage::{bucket, Bucket};
    let wire = real_bucket();
    let b = Bucket::decode(wire.as_slice()).expect("a real Bucket decodes");
    assert_eq!(b.name, "projects/_/buckets/zonal");
    assert_eq!(b.bucket_id, "zonal");
    assert_eq!(b.project, "projects/123");
    assert_eq!(b.metageneration, 7);
    assert_eq!(b.location, "US-CENTRAL1");
    assert_eq!(b.location_type, "zone");
    assert_eq!(b.storage_class, "RAPID");
    let create = b.create_time.expect("create_time");
    assert_eq!((create.seconds, create.nanos), (1_700_000_000, 5));
    let update = b.update_time.expect("update_time");
    assert_eq!((update.seconds, update.nanos), (1_760_000_000, 123_000_000));
    assert_eq!(
        b.logging,
        Some(bucket::Logging {
            log_bucket: "log-bucket".into(),
            log_object_prefix: "logs/".into(),
        })
    );
    assert_eq!(b.etag, "CAc=");
    assert_eq!(
        b.hierarchical_namespace,
        Some(bucket::HierarchicalNamespace { enabled: true })
    );
}

/// The old declaration (`update_time = 18`, a Timestamp) cannot decode it: that
/// was the bug.
#[test]
fn the_old_update_time_number_cannot_decode_a_bucket_with_logging() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldBucket {
        #[prost(message, optional, tag = "18")]
        update_time: Option<prost_types::Timestamp>,
    }
    let wire = real_bucket();
    assert!(OldBucket::decode(wire.as_slice()).is_err());
}
