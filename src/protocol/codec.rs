//! Encoding and decoding of MQTT 3.1, 3.1.1 and 5.0 packets.
//!
//! API (implemented by the codec work item):
//! - `decode(buf, version, max_packet_size)`: consumes one whole packet from the front of
//!   `buf` and returns it, `Ok(None)` when the packet is not complete yet (nothing consumed),
//!   or an error. A CONNECT is decoded according to its own protocol name/level, whatever
//!   `version` says. `max_packet_size` bounds the whole packet (fixed header included) and
//!   is checked as soon as the remaining length is known, before the body is buffered.
//! - `encode(packet, version, buf)`: appends the packet's bytes for a peer speaking `version`.
//! - `encoded_len(packet, version)`: exactly the number of bytes `encode` would write.
