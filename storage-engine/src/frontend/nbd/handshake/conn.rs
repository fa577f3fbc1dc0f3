//! The socket side of negotiation.

use super::frame::*;
use crate::frontend::nbd::transmit::frame::EXPORT_FLAGS;
use crate::frontend::nbd::MAX_PAYLOAD;
use crate::volume::{Exports, VolumeIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum NegotiationError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Frame(#[from] FrameError),
}

/// A connection's byte stream, before or after NBD_OPT_STARTTLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// TLS on a listener: NBD_OPT_STARTTLS turns the connection into TLS with the engine's
/// certificate, and the client must present one of the cluster CA (mutual TLS). When
/// `required`, nothing but STARTTLS and ABORT is answered before that (NBD_REP_ERR_TLS_REQD;
/// NBD_OPT_EXPORT_NAME, which has no error reply, ends the connection): no export is listed,
/// described or opened for a client that has not proved who it is.
pub struct StartTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub required: bool,
}

/// Sends `bytes` and flushes them: the client waits for every reply before it goes on, and over
/// TLS the records the socket could not take at once leave only with a later write or a flush.
async fn send<W: AsyncWrite + Unpin + ?Sized>(s: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

/// Runs the option haggling. Returns the stream (TLS once the client started it) and the
/// claimed volume once the client moves to transmission, `None` if it aborted or asked for an
/// unknown export with NBD_OPT_EXPORT_NAME.
pub async fn negotiate<S>(mut s: S, engine: &dyn Exports, tls: Option<&StartTls>) -> Result<Option<(Box<dyn Stream>, VolumeIo)>, NegotiationError>
where
    S: Stream + 'static,
{
    send(&mut s, &greeting()).await?;
    let mut f = [0u8; 4];
    s.read_exact(&mut f).await?;
    let client = parse_client_flags(f)?;
    let mut s: Box<dyn Stream> = Box::new(s);
    let mut secured = false;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await?;
        let hdr = parse_option_header(h)?;
        let mut payload = vec![0u8; hdr.len as usize];
        s.read_exact(&mut payload).await?;
        let mut out = Vec::new();
        let opt = hdr.option;
        let tls_first = tls.is_some_and(|t| t.required) && !secured;
        match opt {
            OPT_STARTTLS => match tls {
                None => encode_option_reply(&mut out, opt, REP_ERR_UNSUP, b"this server has no certificate (strata-engine --tls-dir)"),
                Some(_) if secured => encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"TLS is already on"),
                Some(_) if !payload.is_empty() => encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data"),
                Some(t) => {
                    encode_option_reply(&mut out, opt, REP_ACK, &[]);
                    send(&mut s, &out).await?;
                    s = Box::new(t.acceptor.accept(s).await?);
                    secured = true;
                    continue;
                }
            },
            OPT_EXPORT_NAME if tls_first => {
                tracing::info!("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a listener that requires TLS: disconnected");
                return Ok(None);
            }
            OPT_ABORT => {
                encode_option_reply(&mut out, opt, REP_ACK, &[]);
                let _ = send(&mut s, &out).await;
                return Ok(None);
            }
            _ if tls_first => {
                encode_option_reply(
                    &mut out,
                    opt,
                    REP_ERR_TLS_REQD,
                    b"this server requires TLS: send NBD_OPT_STARTTLS with a client certificate of the cluster CA",
                );
            }
            OPT_EXPORT_NAME => {
                let name = parse_export_name(&payload)?;
                return match engine.open(&name).await {
                    Ok(conn) => {
                        send(&mut s, &export_name_reply(conn.volume.size(), EXPORT_FLAGS, client.no_zeroes)).await?;
                        Ok(Some((s, conn)))
                    }
                    Err(why) => {
                        tracing::info!(export = %name, "NBD_OPT_EXPORT_NAME refused: {why}");
                        Ok(None)
                    }
                };
            }
            OPT_LIST if !payload.is_empty() => {
                encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
            }
            OPT_LIST => {
                for (name, _) in engine.exports() {
                    encode_option_reply(&mut out, opt, REP_SERVER, &list_entry(&name));
                }
                encode_option_reply(&mut out, opt, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => match parse_info_request(&payload) {
                Err(e) => encode_option_reply(&mut out, opt, REP_ERR_INVALID, e.to_string().as_bytes()),
                // GO claims the volume (attaching a detached one here); INFO only describes it.
                Ok(req) => match if opt == OPT_GO {
                    engine.open(&req.name).await.map(|c| (c.volume.size(), Some(c)))
                } else {
                    engine.describe(&req.name).await.map(|size| (size, None))
                } {
                    Err(msg) => {
                        encode_option_reply(&mut out, opt, REP_ERR_UNKNOWN, msg.to_string().as_bytes());
                    }
                    Ok((size, conn)) => {
                        encode_option_reply(&mut out, opt, REP_INFO, &info_export(size, EXPORT_FLAGS));
                        for r in &req.requests {
                            match *r {
                                INFO_NAME => encode_option_reply(&mut out, opt, REP_INFO, &info_name(&req.name)),
                                INFO_DESCRIPTION => encode_option_reply(&mut out, opt, REP_INFO, &info_description("Strata volume")),
                                INFO_BLOCK_SIZE => encode_option_reply(&mut out, opt, REP_INFO, &info_block_size(1, 4096, MAX_PAYLOAD)),
                                _ => {}
                            }
                        }
                        encode_option_reply(&mut out, opt, REP_ACK, &[]);
                        send(&mut s, &out).await?;
                        if let Some(conn) = conn {
                            return Ok(Some((s, conn)));
                        }
                        continue;
                    }
                },
            },
            _ => {
                let msg = format!("option {opt} is not supported by this server");
                encode_option_reply(&mut out, opt, REP_ERR_UNSUP, msg.as_bytes());
            }
        }
        send(&mut s, &out).await?;
    }
}
