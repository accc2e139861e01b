//! Who may read and write what: authentication, ACLs, isolation between users, operator safety.
//!
//! One test binary per subsystem; shared helpers in `tests/kit` (crate `holdfast_testkit`). Run one part with
//! `cargo test --test security <module>::`.

// The shared test kit (`tests/kit`): `common::daemon`, `common::proxy`, ...
use holdfast_testkit as common;

mod auth;
mod isolation;
mod operator;
