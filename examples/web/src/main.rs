//! The web example (being written).
fn main() {}
