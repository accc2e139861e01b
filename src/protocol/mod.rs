//! The MQTT wire protocol: packets as data (`types`), bytes <-> packets (`codec`),
//! reason codes (`reason`) and topic name/filter rules (`topic`).
//!
//! Pure code, no I/O, except `framed`: the one reader of whole packets from an `AsyncRead`. The codec enforces a maximum packet size on every read
//! before the body is buffered, rejects reserved flag bits, invalid UTF-8, duplicate or
//! misplaced v5 properties, and never panics on any input (fuzzed in `fuzz/`).

pub mod codec;
pub mod framed;
pub mod reason;
pub mod topic;
pub mod types;

pub use codec::{decode, encode, encoded_len, DecodeError};
pub use types::*;
