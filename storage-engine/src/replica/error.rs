//! What a replica's I/O answers: its errors (with the NBD errno of each) and read results.

use crate::device::AlignedBuf;
use crate::pool::PoolError;
use std::io;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("request at {offset} of {len} bytes reaches past the volume's end ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the volume was deleted")]
    Deleted,
    #[error("device I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The replication layer's failure (fenced, no replica reachable, a replica call).
    #[error(transparent)]
    Replication(Box<dyn std::error::Error + Send + Sync>),
    #[error("volume {0} is encrypted and its key is not loaded: attach it with its passphrase")]
    Locked(String),
    #[error("volume {0} is a snapshot and cannot be written; clone it for a writable copy")]
    ReadOnly(String),
    #[error("{} block(s) of 4 KiB fail their checksum, the first at byte {} of the volume", .0.len(), .0.first().copied().unwrap_or(0))]
    Corrupt(Vec<u64>),
    #[error("volume {0} is not served by this node (detached, or moved to another node)")]
    NotServed(String),
    /// The engine is stopping (restart, upgrade): the client should reconnect and send again.
    #[error("volume {0} is not served while this engine stops; reconnect and retry")]
    Stopping(String),
}

impl IoError {
    /// The NBD error (an errno value) for this failure.
    pub fn errno(&self, write: bool) -> u32 {
        match self {
            IoError::OutOfRange { .. } if write => libc::ENOSPC as u32,
            IoError::OutOfRange { .. } => libc::EINVAL as u32,
            IoError::Pool(PoolError::NoSpace) => libc::ENOSPC as u32,
            IoError::Deleted | IoError::Stopping(_) => libc::ESHUTDOWN as u32,
            IoError::Locked(_) => libc::EACCES as u32,
            IoError::ReadOnly(_) => libc::EPERM as u32,
            _ => libc::EIO as u32,
        }
    }
}

/// A read's buffer: its own, or a readahead chunk shared with nobody else by then.
pub enum ReadBuf {
    Owned(AlignedBuf),
    Shared(Arc<super::readahead::Chunked>),
}

/// Read result: `buf[start..start + len]` holds the data.
pub struct ReadData {
    pub buf: ReadBuf,
    pub start: usize,
    pub len: usize,
}

impl ReadData {
    pub fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.buf {
            ReadBuf::Owned(b) => b,
            ReadBuf::Shared(b) => b,
        };
        &all[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for ReadData {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

/// Up to 8 volume offsets, for messages.
pub fn offsets(bad: &[u64]) -> String {
    let mut s = bad.iter().take(8).map(|o| o.to_string()).collect::<Vec<_>>().join(", ");
    if bad.len() > 8 {
        s.push_str(", ...");
    }
    s
}
