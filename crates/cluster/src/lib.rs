//! # courier-cluster
//!
//! Courier as a cluster (work in progress).

#![warn(missing_docs)]

pub mod client;
pub mod network;
pub mod node;
pub mod service;
pub mod state;
pub mod storage;
pub mod types;
