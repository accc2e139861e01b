//! Whole MQTT packets from any byte stream: the one framed reader for broker connections
//! (TCP, TLS and WebSocket alike), and usable by the bridge and tests (issue 16 item 5).
//!
//! The only part of `protocol` that touches I/O, and only through the `AsyncRead` trait: the
//! reader owns its buffer, so [`FramedReader::fill`] (one read into that buffer) is
//! cancel-safe in a `select!`, and [`FramedReader::next_buffered`] decodes whole packets
//! from what was read (mini-redis' `Connection::read_frame`, with a bounded frame size).
//!
//! Memory (issue 17 item 1): a reader with nothing buffered holds no buffer at all, so an
//! idle connection costs none. A read that starts with an empty buffer goes into a
//! `STACK_READ`-byte array on the stack of the poll (never part of the reader's future),
//! and only what arrived is copied into a buffer allocated for it. While a packet is
//! incomplete or reads keep filling the buffer, reads go straight into the buffer, which
//! grows (up to `MAX_ROOM` free at a time) and to the size of the packet being read; once
//! all of it is decoded it is given back. A packet much smaller than the buffer it arrived
//! in is copied out of it before decoding: its payload may live on in a queue, and as a
//! slice of the read buffer it would keep the whole buffer allocated.
//!
//! Invariants:
//! - a packet's declared length is checked against the maximum packet size as soon as the
//!   fixed header is read, before anything is reserved for its body: a 256 MB length costs
//!   nothing but the error;
//! - no more than `MAX_ROOM` is reserved ahead of bytes actually received.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::codec::{decode, DecodeError};
use super::types::{Packet, ProtocolVersion};

/// Free space asked for before a read into a buffer that holds part of a packet, when the
/// connection is quiet.
pub const MIN_ROOM: usize = 256;
/// The stack array a read goes into when nothing is buffered (an idle connection holds no
/// read buffer). 4 KiB: one page of the task's thread stack, only during the poll; larger
/// reads (a read that filled it) go straight into a buffer from then on.
const STACK_READ: usize = 4096;
/// Most free space asked for before one read, while reads keep filling the buffer.
pub const MAX_ROOM: usize = 64 * 1024;
/// A whole packet smaller than the buffer's capacity divided by this is copied out of it.
const COPY_RATIO: usize = 8;

/// Why no packet could be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("connection closed in the middle of a packet ({0} bytes of it read)")]
    Truncated(usize),
}

/// A byte stream read as whole MQTT packets.
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    /// Bytes read and not yet decoded; owned here so that a cancelled read loses nothing.
    /// No allocation while empty between reads.
    buf: BytesMut,
    /// Free space to ask for before the next read: doubles while reads fill it, back to
    /// `MIN_ROOM` once the buffer has been emptied by a read that did not fill it.
    room: usize,
    /// Largest whole packet accepted (fixed header included).
    max_packet_size: usize,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    pub fn new(inner: R, max_packet_size: usize) -> Self {
        FramedReader {
            inner,
            buf: BytesMut::new(),
            room: MIN_ROOM,
            max_packet_size,
        }
    }

    /// Changes the largest packet accepted from now on (e.g. after CONNECT).
    pub fn set_max_packet_size(&mut self, max: usize) {
        self.max_packet_size = max;
    }

    /// Bytes received and not decoded yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// The read buffer's capacity (what the connection costs while idle).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Appends bytes read from the stream elsewhere (e.g. by a poll-based writer that reads
    /// while its write is blocked), to be decoded like any others.
    pub fn push_read(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying stream (e.g. to write to it).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The underlying stream; bytes still buffered are dropped (check [`Self::buffered`]).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Decodes the next whole packet from the bytes already read, if there is one.
    pub fn next_buffered(
        &mut self,
        version: ProtocolVersion,
    ) -> Result<Option<Packet>, DecodeError> {
        let Some(total) = frame_len(&self.buf, self.max_packet_size)? else {
            return Ok(None);
        };
        if self.buf.len() < total {
            return Ok(None);
        }
        let packet = if total * COPY_RATIO <= self.buf.capacity() {
            // Small packet, big buffer: its own allocation, so a payload kept in a queue
            // does not keep the read buffer alive.
            let mut own = BytesMut::from(&self.buf[..total]);
            self.buf.advance(total);
            decode(&mut own, version, self.max_packet_size)?
        } else {
            decode(&mut self.buf, version, self.max_packet_size)?
        };
        if self.buf.is_empty() && self.buf.capacity() > MAX_ROOM.max(self.room * 2) {
            // After a large packet: give the memory back.
            self.buf = BytesMut::new();
        }
        Ok(packet)
    }

    /// One read from the stream into the buffer; `Ok(0)` at the end of the stream.
    /// Cancel-safe: a cancelled read leaves the buffer as it was.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            // Nothing waiting: hold no buffer while the peer is quiet (payloads decoded
            // from the old one keep their own part of it alive).
            self.buf = BytesMut::new();
            let n = std::future::poll_fn(|cx| self.poll_read_unbuffered(cx)).await?;
            self.room = if n >= STACK_READ {
                (self.room * 2).clamp(2 * STACK_READ, MAX_ROOM)
            } else {
                MIN_ROOM
            };
            return Ok(n);
        }
        // Room for the packet being read, once its header says how big it is (bounded by
        // the maximum packet size, which `frame_len` checked).
        let want = match frame_len(&self.buf, self.max_packet_size) {
            Ok(Some(total)) if total > self.buf.len() => (total - self.buf.len()).min(MAX_ROOM),
            _ => 0,
        };
        let room = self.room.max(want);
        let spare = self.buf.capacity() - self.buf.len();
        if spare < room {
            self.buf.reserve(room);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = self.inner.read_buf(&mut self.buf).await?;
        self.room = if n >= spare {
            (self.room * 2).min(MAX_ROOM)
        } else if self.buf.len() == n {
            // A read that did not fill the buffer, and nothing older waiting: quiet again.
            MIN_ROOM
        } else {
            self.room
        };
        Ok(n)
    }

    /// One read into an array on this poll's stack (nothing held while the read is
    /// pending); what arrived is copied into a buffer of its size, or with room for more
    /// when the read filled the array (more is likely waiting).
    fn poll_read_unbuffered(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut rb = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        if !got.is_empty() {
            let capacity = if got.len() >= STACK_READ {
                (self.room * 2).clamp(2 * STACK_READ, MAX_ROOM)
            } else {
                got.len()
            };
            self.buf.reserve(capacity);
            self.buf.extend_from_slice(got);
        }
        Poll::Ready(Ok(got.len()))
    }

    /// Reads until one whole packet is decoded. `Ok(None)`: the stream ended cleanly
    /// between packets. Cancel-safe.
    pub async fn read_packet(
        &mut self,
        version: ProtocolVersion,
    ) -> Result<Option<Packet>, FrameError> {
        loop {
            if let Some(p) = self.next_buffered(version)? {
                return Ok(Some(p));
            }
            if self.fill().await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    n => Err(FrameError::Truncated(n)),
                };
            }
        }
    }
}

/// The whole length of the packet at the front of `buf` once its fixed header is complete;
/// a length above `max` is refused right there.
fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    let Some((header, remaining)) = super::codec::parse_fixed_header(buf)? else {
        return Ok(None);
    };
    let total = header + remaining;
    if total > max {
        return Err(DecodeError::PacketTooLarge);
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests;
