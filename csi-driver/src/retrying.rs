//! A connection to an engine's NBD export that outlives the engine: requests go out at once on a
//! pipelined client (`nbdclient::Client`) and are answered from its reader thread; a request whose
//! connection broke (an engine restart or upgrade) goes to a retry thread, which reconnects and
//! sends it again, for up to two minutes before it fails with EIO. Reads, writes, flushes,
//! discards and zeroing can all be sent twice: the second is the same request to the same place.
//! Shared by the FUSE view (`fusedisk`) and the ublk helper (`ublk`).

use crate::nbdclient::{Client, Endpoint, NbdConn};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a broken connection is retried before requests fail with EIO.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// The connection to the export, shared by whoever sends requests (the FUSE session, the ublk
/// queues) and the reader (which answers them); re-made when it breaks.
pub struct Conn {
    ep: Endpoint,
    export: String,
    client: Mutex<Option<Arc<Client>>>,
    /// The export's size as last seen.
    pub size: AtomicU64,
    /// The export's transmission flags (from the first handshake: an export keeps them).
    pub flags: u16,
    /// Set when reconnecting failed for RECONNECT_FOR: requests then fail at once (after one
    /// connection attempt each) instead of each waiting the whole window again.
    gave_up: AtomicBool,
    /// Requests whose connection broke, for the retry thread to send again once reconnected.
    retry: std::sync::mpsc::Sender<Req>,
}

/// One request from the kernel, kept whole until answered so it can be sent again.
pub struct Req {
    pub cmd: u16,
    pub offset: u64,
    pub len: u32,
    /// A write's data (shared with the connection while it is sent).
    pub payload: Arc<[u8]>,
    /// When it was first sent: it fails after RECONNECT_FOR without a connection.
    pub since: Instant,
    /// Answers the kernel: the data read (empty for other commands) or an errno.
    pub reply: Box<dyn FnOnce(Result<Vec<u8>, i32>) + Send>,
}

impl Conn {
    /// The current client, connecting (and retrying for up to RECONNECT_FOR from `t0`) when
    /// there is none or it broke. One thread connects while the others wait on the lock.
    fn client(&self, t0: Instant) -> Result<Arc<Client>, i32> {
        let mut cur = self.client.lock();
        loop {
            if let Some(c) = cur.as_ref().filter(|c| !c.is_broken()) {
                return Ok(c.clone());
            }
            match NbdConn::connect(&self.ep, &self.export).and_then(Client::new) {
                Ok(c) => {
                    self.size.store(c.size, Ordering::Relaxed);
                    if self.gave_up.swap(false, Ordering::Relaxed) || cur.is_some() {
                        tracing::info!(export = %self.export, "reconnected to the engine");
                    }
                    *cur = Some(c);
                }
                Err(e) if !self.gave_up.load(Ordering::Relaxed) && t0.elapsed() < RECONNECT_FOR => {
                    tracing::warn!(export = %self.export, "reconnecting to the engine: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    if !self.gave_up.swap(true, Ordering::Relaxed) {
                        tracing::error!(export = %self.export, "the engine stayed unreachable for {RECONNECT_FOR:?}: failing I/O until it is back: {e}");
                    }
                    return Err(libc::EIO);
                }
            }
        }
    }

    /// The current client if it is healthy; never waits for a connection.
    fn ready(&self) -> Option<Arc<Client>> {
        self.client.try_lock().and_then(|c| c.as_ref().filter(|c| !c.is_broken()).cloned())
    }

    /// Sends `req` on `c`; its answer goes to the kernel from the connection's reader. A broken
    /// connection hands it to the retry thread (reads, writes, flushes and discards can be sent
    /// again); an NBD error reply is answered as its errno.
    fn send(self: &Arc<Conn>, c: &Client, req: Req) {
        let (cmd, offset, len) = (req.cmd, req.offset, req.len);
        let payload = req.payload.clone();
        let me = self.clone();
        c.submit(
            cmd,
            offset,
            len,
            &payload,
            Box::new(move |answer| match answer {
                Ok((0, data)) => (req.reply)(Ok(data)),
                Ok((err, _)) => (req.reply)(Err(err as i32)),
                Err(e) => {
                    tracing::warn!(export = %me.export, "NBD connection broken, sending again: {e}");
                    if let Err(back) = me.retry.send(req) {
                        (back.0.reply)(Err(libc::EIO));
                    }
                }
            }),
        );
    }

    /// Sends a request from the kernel: at once on a healthy connection, else through the retry
    /// thread (which waits for a new one).
    pub fn submit(self: &Arc<Conn>, req: Req) {
        match self.ready() {
            Some(c) => self.send(&c, req),
            None => {
                if let Err(back) = self.retry.send(req) {
                    (back.0.reply)(Err(libc::EIO));
                }
            }
        }
    }

    /// The retry thread: each request whose connection broke goes out again on a new one.
    fn retry_loop(self: Arc<Conn>, rx: std::sync::mpsc::Receiver<Req>) {
        while let Ok(req) = rx.recv() {
            match self.client(req.since) {
                Ok(c) => self.send(&c, req),
                Err(e) => (req.reply)(Err(e)),
            }
        }
    }

    /// The export's size now (a new handshake: the volume may have grown).
    pub fn refresh_size(&self) -> u64 {
        if let Ok(c) = NbdConn::connect(&self.ep, &self.export) {
            self.size.store(c.size, Ordering::Relaxed);
            c.disconnect();
        }
        self.size.load(Ordering::Relaxed)
    }
}

impl Conn {
    /// A connection over `first` (a client that finished its handshake), with its retry thread.
    pub fn start(ep: Endpoint, export: &str, first: Arc<Client>) -> std::io::Result<Arc<Conn>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let conn = Arc::new(Conn {
            ep,
            export: export.to_string(),
            size: AtomicU64::new(first.size),
            flags: first.flags,
            client: Mutex::new(Some(first)),
            gave_up: AtomicBool::new(false),
            retry: tx,
        });
        let c = conn.clone();
        std::thread::Builder::new().name("nbd-retry".into()).spawn(move || c.retry_loop(rx))?;
        Ok(conn)
    }
}
