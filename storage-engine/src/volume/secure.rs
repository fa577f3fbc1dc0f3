//! The data path of an encrypted volume: plaintext above, ciphertext below (see `crypt`). Reads
//! and writes are widened to whole 4 KiB sectors; an unaligned write is a read-modify-write of
//! its sectors, serialised per volume.

use super::{IoError, ReadBuf, ReadData, VolumeIo};
use crate::crypt::{VolumeKey, SECTOR};
use crate::device::AlignedBuf;
use crate::replica::aligned;

const S: u64 = SECTOR as u64;

impl VolumeIo {
    pub(super) async fn read_secure(&self, key: &VolumeKey, offset: u64, len: usize) -> Result<ReadData, IoError> {
        let a0 = offset - offset % S;
        let a1 = (offset + len as u64).next_multiple_of(S);
        let span = (a1 - a0) as usize;
        let stored = self.read_stored(a0, span).await?;
        let mut buf = self.buffer(span);
        buf.copy_from_slice(stored.bytes());
        drop(stored);
        key.decrypt(a0 / S, &mut buf);
        Ok(ReadData { buf: ReadBuf::Owned(buf), start: (offset - a0) as usize, len })
    }

    pub(super) async fn write_secure(&self, key: &VolumeKey, offset: u64, mut data: AlignedBuf, fua: bool) -> Result<(), IoError> {
        let v = &self.volume;
        let len = data.len() as u64;
        if aligned(offset, len) {
            key.encrypt(offset / S, &mut data);
            return self.write_stored(offset, data, fua).await;
        }
        let _rmw = v.secure_rmw.lock().await;
        let a0 = offset - offset % S;
        let a1 = (offset + len).next_multiple_of(S);
        let plain = self.read_secure(key, a0, (a1 - a0) as usize).await?;
        let mut buf = self.buffer((a1 - a0) as usize);
        buf.copy_from_slice(plain.bytes());
        drop(plain);
        let at = (offset - a0) as usize;
        buf[at..at + len as usize].copy_from_slice(&data);
        key.encrypt(a0 / S, &mut buf);
        self.write_stored(a0, buf, fua).await
    }
}
