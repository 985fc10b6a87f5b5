//! # courier-cluster
//!
//! Courier as a cluster (work in progress).

#![warn(missing_docs)]

pub mod state;
pub mod storage;
pub mod types;
