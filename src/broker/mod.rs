//! The local MQTT broker.
pub mod retained;
pub mod topic_tree;
