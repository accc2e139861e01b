//! Topic names and filters: validation, `$share/` parsing and matching (MQTT 4.7, 4.8.2).
