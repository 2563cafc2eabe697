//! The `mixnn` command.
fn main() {}
