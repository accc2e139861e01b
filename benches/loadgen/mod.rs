//! Load generator for `broker_compare`.

pub mod broker;
pub mod client;
pub mod scenario;
