//! MixNN model description, stage engine, IDX data and the deterministic
//! single-process trainer. Pure: no sockets.
