//! MixNN wire format: fixed-size cells, designer-built onion routing headers
//! and the per-hop peel. Pure: works on byte buffers only, no sockets.
