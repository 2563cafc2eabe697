//! The designer's planning layer: pure, like the node's `core`. No
//! sockets, no runtime, no clock reads (time comes in as an `Instant`
//! argument), randomness from seeded RNGs handed in. Each component takes
//! events (a reply, a tick at `now`) and returns messages or decisions;
//! the I/O layer (`driver`, `exchange`) sends and receives, the session
//! and the runner ([`crate::runner`]) string them together.
//!
//! | module | decides |
//! |---|---|
//! | [`layout`] | which stage each hop runs (dummies, kept stages, loss hop), message sizes |
//! | [`route`] | every onion: which hops a message visits and what each is told |
//! | [`pending`] | which reply answers what |
//! | [`window`] | which steps are in flight, complete, and their losses |
//! | [`steps`] | the training loop of a call: what to send, await, audit, checkpoint, report, in which order |
//! | [`transfer`] | chunked fetches, openings and loads |
//! | [`loops`] | when loops are due, and when one is lost |
//! | [`audit`] | which steps and test batches to audit, the test-phase check |
//! | [`ledger`] | what each hop committed to, and the checks of every delivery (trailer layers, boundaries, state chain) |
//! | [`opening`] | whether one audit passes: its openings against the commitments and a re-execution |
//! | [`recovery`] | checkpoints, the detection bound, which hop failed, where to roll back to |

pub mod audit;
pub mod layout;
pub mod ledger;
pub mod loops;
pub mod opening;
pub mod pending;
pub mod recovery;
pub mod route;
pub mod steps;
pub mod transfer;
pub mod window;
