//! Feeds arbitrary bytes to `decode` for every protocol version. Nothing may panic, and any
//! packet that decodes must survive encode -> decode unchanged (with `encoded_len` equal to
//! the bytes written).
#![no_main]

use bytes::BytesMut;
use holdfast::protocol::{decode, encode, encoded_len, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for version in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut buf = BytesMut::from(data);
        // Decode packets back to back until the input runs out or an error occurs.
        while let Ok(Some(packet)) = decode(&mut buf, version, 1 << 20) {
            let mut out = BytesMut::new();
            encode(&packet, version, &mut out);
            assert_eq!(out.len(), encoded_len(&packet, version), "{packet:?}");
            let again = decode(&mut out, version, usize::MAX);
            assert_eq!(again, Ok(Some(packet)), "re-decoding {version:?}");
            assert!(out.is_empty());
        }
        // A small limit exercises the early PacketTooLarge path.
        let mut buf = BytesMut::from(data);
        let _ = decode(&mut buf, version, 16);
    }
});
