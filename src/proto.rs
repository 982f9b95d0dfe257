//! Generated `google.storage.v2`, `google.storage.control.v2`, `google.longrunning`
//! and `google.rpc` types and gRPC stubs (compiled by `build.rs` from `proto/`). Nothing else
//! lives here: every layer imports its wire types from this module.

#![allow(clippy::all, missing_docs)]

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    pub mod storage {
        pub mod v2 {
            tonic::include_proto!("google.storage.v2");
        }
        pub mod control {
            pub mod v2 {
                tonic::include_proto!("google.storage.control.v2");
            }
        }
    }
}

pub use google::longrunning;
pub use google::rpc::Status as RpcStatus;
pub use google::storage::control::v2 as control;
pub use google::storage::v2 as storage;
