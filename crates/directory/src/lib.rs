//! MixNN directory authority: signed node descriptors, history and random
//! cascade selection with dummy servers (not built yet).
