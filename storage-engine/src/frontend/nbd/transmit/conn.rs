//! The transmission phase of one connection, as one task: a reader that parses requests from a
//! buffer (pure frames, see `frame`), up to [`MAX_INFLIGHT`] request futures running
//! concurrently, and a writer that sends replies in completion order, matched by handle.
//!
//! All three are branches of one `select!` over cancel-safe operations (`read`, vectored
//! `write` or, once every reply is written, `flush`, the next completion), so a request needs
//! no task spawn and no channel hop, and reading never stops while replies are being written (a
//! client that pipelines large writes cannot deadlock us). The flush matters over TLS: a write
//! returns once the TLS session has taken the bytes, and what the socket could not take yet
//! leaves only with a later write or a flush.

use super::frame::*;
use crate::device::AlignedBuf;
use crate::frontend::nbd::{Limits, MAX_INFLIGHT, MAX_PAYLOAD};
use crate::volume::{IoError, ReadData, VolumeIo};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const READ_BUF: usize = 256 * 1024;
const MAX_SLICES: usize = 32;

/// A reply on its way out: header, optional read payload, and how much of both is written.
/// `charge`: the payload bytes its request holds against the limits until it is sent.
/// `hang_up`: not sent; the connection closes instead (the engine is stopping, and the client
/// sends the request again after reconnecting).
struct Out {
    header: [u8; 16],
    data: Option<ReadData>,
    written: usize,
    charge: u64,
    hang_up: bool,
}

impl Out {
    fn new(handle: u64, error: u32, data: Option<ReadData>) -> Out {
        Out { header: simple_reply(error, handle), data, written: 0, charge: 0, hang_up: false }
    }
    fn len(&self) -> usize {
        16 + self.data.as_ref().map_or(0, |d| d.len)
    }
}

type Work = Pin<Box<dyn Future<Output = Out> + Send>>;

/// A WRITE whose payload is still arriving.
struct Partial {
    req: Request,
    buf: AlignedBuf,
    filled: usize,
}

/// Serves requests until the client disconnects (NBD_CMD_DISC or EOF) or breaks the protocol.
/// Replies to requests already received are still sent before the socket closes.
pub async fn serve<S>(stream: S, conn: VolumeIo, limits: Arc<Limits>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Payload bytes this connection holds: writes being received or applied, reads until their
    // reply is sent. Reading stops while it is over the limits (backpressure, not growth).
    let mut held: u64 = 0;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rbuf = vec![0u8; READ_BUF];
    let (mut start, mut end) = (0usize, 0usize);
    let mut partial: Option<Partial> = None;
    let mut work: FuturesUnordered<Work> = FuturesUnordered::new();
    let mut out: VecDeque<Out> = VecDeque::new();
    // Replies were written since the last flush: over TLS the session may still hold records
    // the socket could not take, and only a flush (or a later write) sends them.
    let mut unflushed = false;
    let mut closing = false;
    let conn = Arc::new(conn);
    let vol = conn.volume.clone();
    loop {
        // Turn buffered bytes into requests.
        while !closing && work.len() + out.len() < MAX_INFLIGHT && (partial.is_some() || limits.may_read(held)) {
            if let Some(p) = &mut partial {
                let n = (end - start).min(p.buf.len() - p.filled);
                p.buf[p.filled..p.filled + n].copy_from_slice(&rbuf[start..start + n]);
                p.filled += n;
                start += n;
                if p.filled < p.buf.len() {
                    break;
                }
                let p = partial.take().expect("partial write");
                work.push(dispatch(&conn, p.req, Some(p.buf)));
                continue;
            }
            if end - start < REQUEST_LEN {
                break;
            }
            let hdr: &[u8; REQUEST_LEN] = rbuf[start..start + REQUEST_LEN].try_into().expect("28 bytes");
            start += REQUEST_LEN;
            let req = match parse_request(hdr) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(volume = %vol.name, "closing nbd connection: {e}");
                    closing = true;
                    break;
                }
            };
            let charge = payload_charge(&req);
            match req.cmd {
                CMD_DISC => closing = true,
                CMD_WRITE if req.len > MAX_PAYLOAD => {
                    tracing::warn!(volume = %vol.name, len = req.len, "closing nbd connection: write larger than the advertised maximum");
                    closing = true;
                }
                CMD_WRITE => {
                    held += charge;
                    limits.charge(charge);
                    partial = Some(Partial { req, buf: conn.buffer(req.len as usize), filled: 0 });
                }
                _ => {
                    held += charge;
                    limits.charge(charge);
                    work.push(dispatch(&conn, req, None));
                }
            }
        }
        if start == end {
            (start, end) = (0, 0);
        } else if start > 0 && rbuf.len() - end < REQUEST_LEN {
            rbuf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        if closing && work.is_empty() && out.is_empty() {
            break;
        }
        // Replies waiting for the socket count too, so a client that does not read its replies
        // cannot make us queue without bound.
        let reading = !closing && work.len() + out.len() < MAX_INFLIGHT && (partial.is_some() || limits.may_read(held));
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let nslices = gather(&out, &mut slices);
        let direct = partial.is_some() && start == end;
        let into: &mut [u8] = match &mut partial {
            Some(p) if direct => &mut p.buf[p.filled..],
            _ => &mut rbuf[end..],
        };
        tokio::select! {
            biased;
            Some(reply) = work.next(), if !work.is_empty() => {
                if reply.hang_up {
                    if !closing {
                        tracing::info!(volume = %vol.name, "closing nbd connection: the engine is stopping (the client sends its requests again)");
                    }
                    closing = true;
                    held -= reply.charge;
                    limits.release(reply.charge);
                } else {
                    out.push_back(reply);
                }
            }
            r = send(&mut wr, &slices[..nslices]), if nslices > 0 || unflushed => match r {
                Ok(Sent::Flushed) => unflushed = false,
                Ok(Sent::Bytes(0)) | Err(_) => break,
                Ok(Sent::Bytes(n)) => {
                    let freed = advance(&mut out, n);
                    held -= freed;
                    limits.release(freed);
                    // A flush that is done at once (always on a plain socket) needs no pass of
                    // the loop; one that has to wait is left to the select.
                    unflushed = !matches!(wr.flush().now_or_never(), Some(Ok(())));
                }
            },
            r = rd.read(into), if reading => match r {
                Ok(0) | Err(_) => closing = true,
                Ok(n) if direct => {
                    let p = partial.as_mut().expect("partial write");
                    p.filled += n;
                    if p.filled == p.buf.len() {
                        let p = partial.take().expect("partial write");
                        work.push(dispatch(&conn, p.req, Some(p.buf)));
                    }
                }
                Ok(n) => end += n,
            },
        }
    }
    let _ = wr.shutdown().await;
    // What is still charged (requests cut off with the connection) goes back.
    if let Some(p) = &partial {
        held = held.saturating_sub(payload_charge(&p.req));
        limits.release(payload_charge(&p.req));
    }
    let unsent: u64 = out.iter().map(|o| o.charge).sum();
    limits.release(unsent);
    held = held.saturating_sub(unsent);
    // Requests still running hold their charge until they finish, here.
    while let Some(o) = work.next().await {
        limits.release(o.charge);
        held = held.saturating_sub(o.charge);
    }
    debug_assert_eq!(held, 0, "every charged byte released");
    drop(conn);
}

enum Sent {
    Bytes(usize),
    Flushed,
}

/// Writes `slices` (vectored, cancel-safe: how much went), or with nothing left to write,
/// flushes what the stream still holds.
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, slices: &[IoSlice<'_>]) -> std::io::Result<Sent> {
    if slices.is_empty() {
        wr.flush().await.map(|()| Sent::Flushed)
    } else {
        wr.write_vectored(slices).await.map(Sent::Bytes)
    }
}

/// The payload bytes a request holds: a write's data, a read's reply.
fn payload_charge(req: &Request) -> u64 {
    match req.cmd {
        CMD_WRITE | CMD_READ => req.len as u64,
        _ => 0,
    }
}

/// Fills `slices` from the front of the queue (what is left of each reply).
fn gather<'a>(out: &'a VecDeque<Out>, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
    let mut n = 0;
    for o in out {
        if n + 2 > MAX_SLICES {
            break;
        }
        if o.written < 16 {
            slices[n] = IoSlice::new(&o.header[o.written..]);
            n += 1;
        }
        if let Some(d) = &o.data {
            let skip = o.written.saturating_sub(16);
            slices[n] = IoSlice::new(&d.bytes()[skip..]);
            n += 1;
        }
    }
    n
}

/// Marks `n` bytes as written, dropping finished replies (and their buffers); returns the
/// payload charge the finished replies release.
fn advance(out: &mut VecDeque<Out>, mut n: usize) -> u64 {
    let mut freed = 0;
    while n > 0 {
        let front = out.front_mut().expect("wrote more than queued");
        let left = front.len() - front.written;
        if n >= left {
            n -= left;
            freed += front.charge;
            out.pop_front();
        } else {
            front.written += n;
            n = 0;
        }
    }
    freed
}

fn dispatch(conn: &Arc<VolumeIo>, req: Request, payload: Option<AlignedBuf>) -> Work {
    let io = conn.clone();
    let charge = payload_charge(&req);
    Box::pin(async move {
        let mut out = reply(&io, req, payload).await;
        out.charge = charge;
        out.hang_up = io.volume.is_stopping() && out.header[4..8] != [0; 4];
        out
    })
}

async fn reply(io: &VolumeIo, req: Request, payload: Option<AlignedBuf>) -> Out {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (off, len, h) = (req.offset, req.len as u64, req.handle);
    let err = |r: Result<(), IoError>| r.err().map_or(0, |e| e.errno(true));
    match req.cmd {
        CMD_READ if req.len > MAX_PAYLOAD => Out::new(h, libc::EINVAL as u32, None),
        CMD_READ => match io.read(off, req.len as usize).await {
            Ok(d) => Out::new(h, 0, Some(d)),
            Err(e) => Out::new(h, e.errno(false), None),
        },
        CMD_WRITE => {
            let buf = payload.expect("write payload");
            Out::new(h, err(io.write(off, buf, fua).await), None)
        }
        CMD_FLUSH => Out::new(h, err(io.flush().await), None),
        CMD_TRIM => Out::new(h, err(io.trim(off, len, fua).await), None),
        CMD_WRITE_ZEROES => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            Out::new(h, err(io.write_zeroes(off, len, no_hole, fua).await), None)
        }
        _ => Out::new(h, libc::EINVAL as u32, None),
    }
}
