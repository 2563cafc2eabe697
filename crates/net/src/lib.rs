//! MixNN I/O: Noise-authenticated TCP links that carry fixed-size cells, and
//! node key storage. This is the only crate in the workspace that opens sockets.
