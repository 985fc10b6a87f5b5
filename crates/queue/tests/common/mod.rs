//! Helpers shared by the queue's tests.

pub use courier_test_support::TempDir;
