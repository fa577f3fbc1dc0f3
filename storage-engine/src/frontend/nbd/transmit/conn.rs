//! The transmission phase: a reader that parses requests and spawns one task per request, and a
//! writer that sends replies in completion order, matched by handle.

use super::frame::*;
use crate::frontend::nbd::{MAX_INFLIGHT, MAX_PAYLOAD};
use crate::volume::{Connection, Engine, IoError, ReadData};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};

struct Reply {
    handle: u64,
    error: u32,
    data: Option<ReadData>,
}

/// Serves requests until the client disconnects (NBD_CMD_DISC or EOF) or breaks the protocol.
/// Replies to requests already received are still sent before the socket closes.
pub async fn serve<S>(stream: S, conn: Connection, engine: Arc<Engine>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Reply>(MAX_INFLIGHT);
    let writer = tokio::spawn(write_replies(wr, rx));
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let vol = conn.volume.clone();
    loop {
        let mut h = [0u8; REQUEST_LEN];
        if rd.read_exact(&mut h).await.is_err() {
            break;
        }
        let req = match parse_request(&h) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(volume = %vol.name, "closing nbd connection: {e}");
                break;
            }
        };
        if req.cmd == CMD_DISC {
            break;
        }
        let payload = if req.cmd == CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                tracing::warn!(volume = %vol.name, len = req.len, "closing nbd connection: write larger than the advertised maximum");
                break;
            }
            let mut buf = engine.buffer(req.len as usize);
            if rd.read_exact(&mut buf).await.is_err() {
                break;
            }
            Some(buf)
        } else {
            None
        };
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let (engine, vol, tx) = (engine.clone(), vol.clone(), tx.clone());
        tokio::spawn(async move {
            let fua = req.flags & CMD_FLAG_FUA != 0;
            let (off, len) = (req.offset, req.len as u64);
            let einval = libc::EINVAL as u32;
            let errno = |e: IoError, write: bool| e.errno(write);
            let reply = match req.cmd {
                CMD_READ if req.len > MAX_PAYLOAD => Reply { handle: req.handle, error: einval, data: None },
                CMD_READ => match engine.read(&vol, off, req.len as usize).await {
                    Ok(d) => Reply { handle: req.handle, error: 0, data: Some(d) },
                    Err(e) => Reply { handle: req.handle, error: errno(e, false), data: None },
                },
                CMD_WRITE => {
                    let buf = payload.expect("write payload read above");
                    let r = engine.write(&vol, off, buf, fua).await;
                    Reply { handle: req.handle, error: r.err().map_or(0, |e| errno(e, true)), data: None }
                }
                CMD_FLUSH => {
                    let r = engine.flush(&vol).await;
                    Reply { handle: req.handle, error: r.err().map_or(0, |e| errno(e, true)), data: None }
                }
                CMD_TRIM => {
                    let r = engine.trim(&vol, off, len, fua).await;
                    Reply { handle: req.handle, error: r.err().map_or(0, |e| errno(e, true)), data: None }
                }
                CMD_WRITE_ZEROES => {
                    let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
                    let r = engine.write_zeroes(&vol, off, len, no_hole, fua).await;
                    Reply { handle: req.handle, error: r.err().map_or(0, |e| errno(e, true)), data: None }
                }
                _ => Reply { handle: req.handle, error: einval, data: None },
            };
            let _ = tx.send(reply).await;
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
    drop(conn);
}

async fn write_replies<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::Receiver<Reply>) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let mut broken = false;
    while let Some(first) = rx.recv().await {
        if broken {
            continue; // keep draining so request tasks never block on a dead socket
        }
        let mut next = Some(first);
        while let Some(r) = next {
            if write_one(&mut w, &r).await.is_err() {
                broken = true;
                break;
            }
            next = rx.try_recv().ok();
        }
        if !broken && w.flush().await.is_err() {
            broken = true;
        }
    }
}

async fn write_one<W: AsyncWrite + Unpin>(w: &mut W, r: &Reply) -> std::io::Result<()> {
    w.write_all(&simple_reply(r.error, r.handle)).await?;
    if let Some(d) = &r.data {
        w.write_all(d.bytes()).await?;
    }
    Ok(())
}
