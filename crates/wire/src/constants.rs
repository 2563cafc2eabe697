//! Every fixed size of the MixNN wire format, derived in one place.
//!
//! Three parameters decide the format: [`MAX_HOPS`] (longest cascade, stages
//! plus dummies), [`BLOCK_LEN`] (one hop's routing block) and [`MAC_LEN`]
//! (the per-hop integrity tag). [`NOTES_LEN`] and [`MIN_FIRST_BODY`] size the
//! designer's notes and the body room in a message's first cell; everything
//! else, [`CELL_SIZE`] included, follows from these.
//!
//! ```text
//! HEADER_LEN  = PREFIX_LEN + MAX_HOPS * BLOCK_LEN + MAC_LEN
//! CELL_SIZE   = next_power_of_two(PREAMBLE_LEN + HEADER_LEN + NOTES_LEN + MIN_FIRST_BODY)
//! ```

/// Most hops a routing header can carry (stages plus dummies).
pub const MAX_HOPS: usize = 32;

/// Bytes of one hop's routing block (the plaintext a hop peels off β).
pub const BLOCK_LEN: usize = 128;

/// Bytes of the per-hop MAC γ (BLAKE3 keyed hash, truncated).
pub const MAC_LEN: usize = 16;

/// Bytes of a symmetric key (ChaCha20, BLAKE3, session roots).
pub const KEY_LEN: usize = 32;

/// Bytes of an identifier: session id, per-hop tag, reply id.
pub const ID_LEN: usize = 16;

/// Bytes of the header prefix: the X25519 group element α for init
/// messages, or `session id ‖ encrypted counter` for session messages.
pub const PREFIX_LEN: usize = 32;

/// Bytes of the encrypted counter field in a session prefix (one AES block).
pub const CTR_FIELD_LEN: usize = PREFIX_LEN - ID_LEN;

/// Bytes of β, the routing information for [`MAX_HOPS`] hops.
pub const BETA_LEN: usize = MAX_HOPS * BLOCK_LEN;

/// Bytes of a routing header: `prefix ‖ β ‖ γ`; the same at every hop.
pub const HEADER_LEN: usize = PREFIX_LEN + BETA_LEN + MAC_LEN;

/// Bytes of the layered designer-to-hop notes; the same at every hop.
pub const NOTES_LEN: usize = 4096;

/// Bytes of the length prefix in front of each hop's note.
pub const NOTE_LEN_PREFIX: usize = 2;

/// Longest single note (all of the notes area less its length prefix).
pub const MAX_NOTE_LEN: usize = NOTES_LEN - NOTE_LEN_PREFIX;

/// Bytes in front of the header in a first cell: kind (1) ‖ body length (u32 LE).
pub const PREAMBLE_LEN: usize = 1 + 2 + 4;

/// Body bytes the first cell must have room for, at least.
pub const MIN_FIRST_BODY: usize = 4096;

/// Bytes of every cell on a MixNN link, for every op and hop position.
pub const CELL_SIZE: usize =
    (PREAMBLE_LEN + HEADER_LEN + NOTES_LEN + MIN_FIRST_BODY).next_power_of_two();

/// Body bytes carried by the first cell of a message.
pub const FIRST_CELL_BODY: usize = CELL_SIZE - PREAMBLE_LEN - HEADER_LEN - NOTES_LEN;

/// Largest body a message may carry (64 MiB): a cap on what a receiver buffers.
pub const MAX_BODY_LEN: usize = 64 << 20;

/// Most cells one message may span (a body of [`MAX_BODY_LEN`] bytes).
pub const MAX_CELLS: usize = 1 + (MAX_BODY_LEN - FIRST_CELL_BODY).div_ceil(CELL_SIZE);

/// Counters a hop remembers behind the highest one it has seen (replay window).
pub const REPLAY_WINDOW: u64 = 1024;

/// Counters ahead of the highest one seen whose lookup tokens a hop keeps
/// ready (packets the designer built but the hop has not seen yet, e.g.
/// a backward that overtakes forwards).
pub const TOKEN_LOOKAHEAD: u64 = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_tied_together() {
        assert_eq!(HEADER_LEN, PREFIX_LEN + MAX_HOPS * BLOCK_LEN + MAC_LEN);
        assert_eq!(
            CELL_SIZE,
            PREAMBLE_LEN + HEADER_LEN + NOTES_LEN + FIRST_CELL_BODY
        );
        const { assert!(CELL_SIZE.is_power_of_two()) };
        const { assert!(FIRST_CELL_BODY >= MIN_FIRST_BODY) };
        assert_eq!(PREFIX_LEN, ID_LEN + CTR_FIELD_LEN);
        assert_eq!(CTR_FIELD_LEN, 16, "one AES block");
        const { assert!(MAX_NOTE_LEN <= u16::MAX as usize) };
        const {
            assert!(
                MAX_CELLS <= u16::MAX as usize,
                "cell count fits the preamble"
            )
        };
        const { assert!(MAX_BODY_LEN <= u32::MAX as usize) };
        const { assert!(FIRST_CELL_BODY + (MAX_CELLS - 1) * CELL_SIZE >= MAX_BODY_LEN) };
    }

    #[test]
    fn format_meets_the_issue_bounds() {
        const { assert!(MAX_HOPS >= 32, "issue 3: at least 32 hops") };
        const {
            assert!(
                CELL_SIZE >= 8 << 10 && CELL_SIZE <= 16 << 10,
                "8–16 KiB cells"
            )
        };
        assert_eq!(CELL_SIZE, 16384);
        assert_eq!(HEADER_LEN, 4144);
    }
}
