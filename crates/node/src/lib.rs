//! MixNN node daemon: accepts links, peels one onion layer per cell, runs its
//! stage and forwards the result to its neighbour.
