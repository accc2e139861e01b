//! Encoding and decoding of MQTT 3.1, 3.1.1 and 5.0 packets.
//!
//! - [`decode`]`(buf, version, max_packet_size)`: consumes one whole packet from the front of
//!   `buf` and returns it, `Ok(None)` when the packet is not complete yet (nothing consumed),
//!   or an error. A CONNECT is decoded according to its own protocol name/level, whatever
//!   `version` says. `max_packet_size` bounds the whole packet (fixed header included) and
//!   is checked as soon as the remaining length is known, before the body is buffered.
//! - [`encode`]`(packet, version, buf)`: appends the packet's bytes for a peer speaking
//!   `version` (a CONNECT is written in the format of its own `protocol` field).
//! - [`encoded_len`]`(packet, version)`: exactly the number of bytes `encode` would write.
//!
//! Decoding is zero-copy for binary data: the frame is split off the read buffer and frozen,
//! and payloads, passwords, correlation and authentication data are slices of it. UTF-8
//! strings are validated (well-formed, no U+0000) and copied once. Topic names and filters
//! are *not* validated beyond that (wildcards, `$share/`, length): that is `topic`'s job.
//!
//! Encoding never fails. Fields that cannot be represented are handled as follows: strings and
//! binary data longer than 65 535 bytes are truncated (on a char boundary); DUP is only written
//! for QoS > 0; CONNACK Session Present is only written with reason code 0 (and never for
//! MQTT 3.1); v5-only data (and a password without a user name) is left out for 3.x peers; a 3.x SUBACK writes 0x80 for every code
//! other than 0, 1, 2. AUTH exists only in MQTT 5 and is always written in the v5 format.
//! The caller must keep packets below the peer's maximum packet size (check `encoded_len`).

mod decode;
mod encode;
mod props;
#[cfg(test)]
mod tests;

use bytes::{Buf, BytesMut};

use super::reason;
use super::types::{Packet, ProtocolVersion};

/// Why a packet could not be decoded. The broker closes the connection after any of these,
/// sending a CONNACK/DISCONNECT with [`DecodeError::reason_code`] where the protocol allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The whole packet (fixed header included) is larger than the allowed maximum.
    #[error("packet too large")]
    PacketTooLarge,
    /// The bytes do not form a valid packet (bad lengths, flags, UTF-8, property ids, ...).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed bytes that break a protocol rule (duplicate property, zero Topic Alias, ...).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// CONNECT with a known protocol name but a protocol level we do not speak.
    #[error("unsupported protocol version (level {0})")]
    UnsupportedProtocolVersion(u8),
    /// CONNECT whose protocol name is neither `MQTT` nor `MQIsdp`.
    #[error("invalid protocol name")]
    InvalidProtocolName,
}

impl DecodeError {
    /// The MQTT 5 reason code to report this error with (CONNACK or DISCONNECT).
    ///
    /// For 3.x peers map it with [`reason::v3_connack_return_code`] (only meaningful for
    /// CONNECT errors: 0x84 becomes return code 0x01; other errors just close the connection).
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::PacketTooLarge => reason::PACKET_TOO_LARGE,
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::UnsupportedProtocolVersion(_) | DecodeError::InvalidProtocolName => {
                reason::UNSUPPORTED_PROTOCOL_VERSION
            }
        }
    }
}

/// Largest value a Variable Byte Integer can hold (4 bytes).
pub const MAX_VARINT: usize = 268_435_455;

/// Most `decode` reserves ahead for an incomplete packet.
const MAX_RESERVE: usize = 64 * 1024;

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` (consuming nothing) while the packet is incomplete. Once the fixed
/// header is complete, a packet larger than `max_packet_size` is rejected with
/// [`DecodeError::PacketTooLarge`] without waiting for its body, and `buf` is grown to hold
/// the rest of the packet (by at most 64 KiB per call). `version` selects the format of every packet except CONNECT,
/// which is decoded according to its own protocol name and level.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((header_len, remaining)) = parse_fixed_header(buf)? else {
        return Ok(None);
    };
    // Cannot overflow: header_len <= 5 and remaining <= MAX_VARINT.
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge);
    }
    if buf.len() < total {
        // Make room for the rest, but a header alone cannot make us allocate a lot.
        buf.reserve((total - buf.len()).min(MAX_RESERVE));
        return Ok(None);
    }
    let first = buf[0];
    let mut frame = buf.split_to(total);
    frame.advance(header_len);
    let body = frame.freeze();
    decode::packet(first, &body, version).map(Some)
}

/// Parses the fixed header at the front of `buf`: `Some((header length, remaining length))`,
/// `None` if incomplete.
pub(super) fn parse_fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(DecodeError::Malformed(
                    "remaining length not minimally encoded",
                ));
            }
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

/// Appends `packet` to `buf`, encoded for a peer speaking `version` (a CONNECT uses its own
/// `protocol`). Reserves the needed space once, up front.
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) {
    let remaining = encode::body_len(packet, version);
    buf.reserve(1 + encode::varint_len(remaining) + remaining);
    encode::write(packet, version, remaining, buf);
}

/// The exact number of bytes [`encode`] writes for `packet`.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let remaining = encode::body_len(packet, version);
    1 + encode::varint_len(remaining) + remaining
}
