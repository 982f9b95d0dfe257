//! The read engine (`docs/architecture.md`, "The read path"): FUSE reads are served from a per-inode
//! readahead cache, which asks a prefetcher for sequential windows, which
//! dispatches block-sized ranges through the object client into page-aligned
//! mmap'd blocks ([`buffer`]) under one global memory budget.

pub mod buffer;
pub mod cache;
pub mod prefetch;

pub use cache::{ReadData, ReadEngine, ReadError};
pub use prefetch::PrefetchConfig;
