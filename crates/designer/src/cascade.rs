//! The cascade file: the designer's list of nodes, in order, with the keys
//! their operators publish.
//!
//! ```toml
//! [[hop]]
//! addr = "127.0.0.1:7001"
//! onion = "9f…"   # X25519 onion key, 64 hex digits
//! link = "3c…"    # Noise static key, 64 hex digits
//! arith = 1         # the arithmetic it computes (docs/arithmetic.md);
//!                   # optional, 1 when left out
//! ```

use std::net::SocketAddr;
use std::path::Path;

use mixnn_model::arith::ARITH_VERSION;
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
    /// The arithmetic it computes (`docs/arithmetic.md`); a designer
    /// refuses a hop whose arithmetic is not its own
    /// ([`HopInfo::check_arith`]). A cascade file may leave it out: then
    /// the hop is taken to compute [`ARITH_VERSION`], and a node that does
    /// not refuses the init.
    #[serde(default = "this_arith")]
    pub arith: u32,
}

fn this_arith() -> u32 {
    ARITH_VERSION
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

    /// Refuses a hop that computes another arithmetic than this build:
    /// its results could not equal the designer's, so neither identity
    /// with one process nor audits would hold.
    pub fn check_arith(&self) -> Result<(), DesignerError> {
        if self.arith == ARITH_VERSION {
            Ok(())
        } else {
            Err(DesignerError::Arith {
                addr: self.addr,
                got: self.arith,
                expected: ARITH_VERSION,
            })
        }
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
            h.check_arith()?;
        }
        Ok(file)
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const KEYS: &str = "onion = \"1111111111111111111111111111111111111111111111111111111111111111\"\n\
                        link = \"2222222222222222222222222222222222222222222222222222222222222222\"\n";

    #[test]
    fn a_hop_of_another_arithmetic_is_refused_in_one_line() {
        let (_d, path) = write(&format!(
            "[[hop]]\naddr = \"127.0.0.1:7001\"\n{KEYS}\n[[hop]]\naddr = \"127.0.0.1:7002\"\n{KEYS}arith = {}\n",
            ARITH_VERSION + 1
        ));
        let err = CascadeFile::load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "hop 127.0.0.1:7002 computes arith {}, this designer arith {ARITH_VERSION} \
                 (docs/arithmetic.md): its results could not equal ours; use a node of the same arithmetic",
                ARITH_VERSION + 1
            )
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn a_hop_without_arith_is_taken_to_compute_ours_and_round_trips() {
        let (_d, path) = write(&format!("[[hop]]\naddr = \"127.0.0.1:7001\"\n{KEYS}"));
        let file = CascadeFile::load(&path).unwrap();
        assert_eq!(file.hop[0].arith, ARITH_VERSION);
        let (_d2, again) = write(&file.to_toml());
        assert_eq!(CascadeFile::load(&again).unwrap(), file);
        assert!(file.to_toml().contains(&format!("arith = {ARITH_VERSION}")));
    }
}
