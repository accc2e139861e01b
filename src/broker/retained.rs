//! Retained messages indexed by topic, queried by filter on SUBSCRIBE.
