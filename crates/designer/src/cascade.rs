//! The cascade file: the designer's list of nodes, in order, with the keys
//! their operators publish.
//!
//! ```toml
//! [[hop]]
//! addr = "127.0.0.1:7001"
//! onion = "9f…"   # X25519 onion key, 64 hex digits
//! link = "3c…"    # Noise static key, 64 hex digits
//! ```

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::DesignerError;

/// One node as the designer knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopInfo {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its X25519 onion key, hex.
    pub onion: String,
    /// Its Noise link key, hex.
    pub link: String,
}

impl HopInfo {
    /// The onion key's bytes.
    pub fn onion_key(&self) -> Result<[u8; 32], DesignerError> {
        parse_key(&self.onion, "onion", self.addr)
    }

    /// The link key's bytes.
    pub fn link_key(&self) -> Result<[u8; 32], DesignerError> {
        parse_key(&self.link, "link", self.addr)
    }
}

fn parse_key(hex_key: &str, what: &str, addr: SocketAddr) -> Result<[u8; 32], DesignerError> {
    let bytes = hex::decode(hex_key.trim()).map_err(|e| DesignerError::Config {
        message: format!("hop {addr}: {what} key is not hex: {e}"),
    })?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| DesignerError::Config {
            message: format!("hop {addr}: {what} key has {} bytes, expected 32", b.len()),
        })
}

/// A cascade: hops in forward order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CascadeFile {
    /// The hops.
    pub hop: Vec<HopInfo>,
}

impl CascadeFile {
    /// Reads and checks a cascade file.
    pub fn load(path: &Path) -> Result<Self, DesignerError> {
        let text = std::fs::read_to_string(path).map_err(|e| DesignerError::Config {
            message: format!("{}: {e}", path.display()),
        })?;
        let file: CascadeFile = toml::from_str(&text).map_err(|e| DesignerError::Config {
            message: format!("{}: {}", path.display(), e.message().replace('\n', " ")),
        })?;
        if file.hop.is_empty() {
            return Err(DesignerError::Config {
                message: format!("{}: no [[hop]]", path.display()),
            });
        }
        for h in &file.hop {
            h.onion_key()?;
            h.link_key()?;
        }
        Ok(file)
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}
