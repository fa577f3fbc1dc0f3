//! A TCP forwarder that can be cut: the link between two processes, partitioned on demand.
//! Cut: bytes stop flowing both ways and new connections hang unanswered (as when packets are
//! dropped: peers see timeouts, not resets). Heal: the stalled connections are closed (as after
//! a long partition) and new ones are forwarded again.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub addr: String,
    cut: Arc<AtomicBool>,
    /// Bumped by `heal`: connections from before a cut are closed.
    era: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<(u64, TcpStream)>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Forwards a new loopback port to `upstream`.
    pub fn start(upstream: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        l.set_nonblocking(true).unwrap();
        let (cut, era, conns, stop) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (c2, e2, k2, s2, up) = (cut.clone(), era.clone(), conns.clone(), stop.clone(), upstream.to_string());
        std::thread::spawn(move || {
            while !s2.load(Ordering::Acquire) {
                let (client, _) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let my_era = e2.load(Ordering::Acquire);
                k2.lock().unwrap().push((my_era, client.try_clone().unwrap()));
                let (c3, e3, up) = (c2.clone(), e2.clone(), up.clone());
                std::thread::spawn(move || {
                    // While cut, a new connection is held unanswered.
                    while c3.load(Ordering::Acquire) {
                        if e3.load(Ordering::Acquire) != my_era {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let Ok(server) = TcpStream::connect(&up) else {
                        let _ = client.shutdown(Shutdown::Both);
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    let _ = client.set_nodelay(true);
                    let (a, b) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let (c4, c5) = (c3.clone(), c3.clone());
                    std::thread::spawn(move || pump(a, b, c4));
                    pump(server, client, c5);
                });
            }
        });
        Proxy { addr, cut, era, conns, stop }
    }

    /// Partitions the link.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
    }

    /// Ends the partition: connections that lived through it are closed.
    pub fn heal(&self) {
        let old = self.era.fetch_add(1, Ordering::AcqRel);
        for (era, s) in self.conns.lock().unwrap().drain(..) {
            if era <= old {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.heal();
    }
}

/// Copies `from` to `to` until either side closes; while cut, holds what it read.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while cut.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
            if to.peer_addr().is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
