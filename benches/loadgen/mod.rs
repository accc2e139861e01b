//! Load generator for `broker_compare`, `durable_compare` and `bridge_compare`. Each
//! bench uses a different part of it, so unused items are expected.
#![allow(dead_code)]

pub mod bridge;
pub mod broker;
pub mod client;
pub mod durable;
pub mod scenario;
