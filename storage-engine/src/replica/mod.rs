//! One volume's data in this node's pool, as a replica: reads, writes, flushes, trims and
//! zeroing (`io`), each refused once a newer epoch was seen here, so a fenced target's requests
//! cannot land. No metadata store and no networking: the target (`replication`) and the served
//! volume (`volume`) sit above.

mod error;
mod io;
pub mod readahead;

pub use error::{offsets, IoError, ReadBuf, ReadData};
pub use io::aligned;

use crate::alerts::Alerts;
use crate::device::{AlignedBuf, BufPool};
use crate::pool::Pool;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

static BOOT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// This machine's boot (the kernel's random boot id), read once.
pub fn boot_id() -> &'static [u8] {
    BOOT.get_or_init(|| std::fs::read("/proc/sys/kernel/random/boot_id").map(|b| b.trim_ascii().to_vec()).unwrap_or_default())
}

/// A boot id of this engine run's own, so targets treat this node as rebooted (its replicas may
/// miss writes: they are rebuilt). Used under `--simulate-volatile-cache` (every start is a
/// power cycle) and after `check --repair` salvaged a journal. Call before serving.
pub fn new_boot_id() {
    let _ = BOOT.set(format!("fresh-{}-{}", std::process::id(), crate::clock::now_unix()).into_bytes());
}

/// One volume's replica on this node: its size, I/O lock, epoch fence and readahead.
pub struct Replica {
    pub id: u64,
    pub name: String,
    pub(crate) size: AtomicU64,
    /// Shared by ordinary I/O; exclusive for read-modify-write and for freeing extents.
    pub(crate) io_lock: tokio::sync::RwLock<()>,
    pub(crate) deleted: AtomicBool,
    /// Bumped after every completed write, trim or zeroing (readahead coherence).
    pub(crate) write_gen: AtomicU64,
    pub(crate) readahead: readahead::Readahead,
    /// The newest epoch seen for this volume (requests of older ones are refused).
    pub(crate) epoch: AtomicU64,
    /// Replica requests hold it shared, a new target's HELLO exclusively.
    pub(crate) fence: tokio::sync::RwLock<()>,
    /// A snapshot: writes are refused.
    pub read_only: bool,
    /// The node whose HELLO was accepted at the newest epoch (known from its certificate):
    /// the only node whose data requests this replica takes.
    announcer: parking_lot::Mutex<Option<String>>,
}

impl Replica {
    pub fn new(id: u64, name: &str, size: u64, epoch: u64, read_only: bool) -> Replica {
        Replica {
            id,
            name: name.to_string(),
            size: AtomicU64::new(size),
            io_lock: tokio::sync::RwLock::new(()),
            deleted: AtomicBool::new(false),
            write_gen: AtomicU64::new(0),
            readahead: Default::default(),
            epoch: AtomicU64::new(epoch),
            fence: tokio::sync::RwLock::new(()),
            read_only,
            announcer: parking_lot::Mutex::new(None),
        }
    }

    /// The node whose HELLO this replica accepted last (None: none yet, or not authenticated).
    pub fn announcer(&self) -> Option<String> {
        self.announcer.lock().clone()
    }

    pub(crate) fn set_announcer(&self, node: &str) {
        *self.announcer.lock() = Some(node.to_string());
    }

    /// Accepts `epoch` if it is not older than the newest seen, remembering it.
    pub fn admit_epoch(&self, epoch: u64) -> bool {
        self.epoch.fetch_max(epoch, Ordering::AcqRel) <= epoch
    }

    /// The newest epoch this replica has seen (it refuses requests of older ones).
    pub fn newest_epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A replica learns a grown size from its target.
    pub fn grow_to(&self, size: u64) {
        self.size.fetch_max(size, Ordering::AcqRel);
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}

/// This node's replicas' shared data path: the pool, I/O buffers, readahead budget, and the
/// alerts a failed checksum raises.
pub struct Local {
    pub pool: Arc<Pool>,
    bufs: BufPool,
    pub alerts: Arc<Alerts>,
    /// This node's id (for alert texts).
    node: String,
    /// Bytes read ahead of a sequential reader (0 = off).
    pub readahead_window: AtomicU64,
    /// Readahead bytes held by all volumes (bounded by `readahead::GLOBAL_LIMIT`).
    readahead_held: Arc<AtomicU64>,
}

impl Local {
    pub fn new(pool: Arc<Pool>, alerts: Arc<Alerts>, node: &str) -> Local {
        Local {
            pool,
            bufs: BufPool::new(),
            alerts,
            node: node.to_string(),
            readahead_window: AtomicU64::new(readahead::WINDOW),
            readahead_held: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A pooled buffer (for a write payload or a read).
    pub fn buffer(&self, len: usize) -> AlignedBuf {
        self.bufs.get(len)
    }
}
