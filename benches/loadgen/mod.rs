//! Load generator for `broker_compare`, `durable_compare` and `bridge_compare`. Each
//! bench uses a different part of it, so unused items are expected.
#![allow(dead_code)]

pub mod bridge;
pub mod broker;
pub mod client;
pub mod durable;
pub mod fanout;
pub mod scenario;

/// The command line that reproduces this run (printed with every result table).
pub fn bench_command(bench: &str) -> String {
    let shown: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if shown.is_empty() {
        format!("cargo bench --bench {bench}")
    } else {
        format!("cargo bench --bench {bench} -- {}", shown.join(" "))
    }
}

/// The multi-thread runtime the load generator runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
