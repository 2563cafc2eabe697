//! Chunked transfers, the one way bulk bytes travel between a hop and the
//! designer: a fetch of a stage's state, an audit opening (both from a
//! hop, [`Download`]) and a state load (to a hop, [`upload`]). Every chunk
//! is a [`ParamChunk`]: the whole transfer's length and a slice of at most
//! [`room`] bytes, as large as one message under the padding policy
//! carries.
//!
//! A download asks for chunk 0 first; its answer announces the total, and
//! the designer then asks for every other chunk at once.

use mixnn_proto::ParamChunk;
use mixnn_wire::PaddingPolicy;

use crate::error::BadReply;

/// Bytes of payload per chunk message under `policy`
/// ([`mixnn_proto::chunk_room`]: the body less the chunk's length field
/// and the seal).
pub fn room(policy: &PaddingPolicy) -> usize {
    mixnn_proto::chunk_room(policy.max_body())
}

/// The most bytes an encoded state of a stage of `spec` trained with
/// `opt` can take ([`mixnn_proto::state_bound`], the bound a hop applies
/// to a load too).
pub fn state_bound(
    spec: &mixnn_model::spec::StageSpec,
    opt: &mixnn_model::optim::Optimizer,
) -> usize {
    mixnn_proto::state_bound(spec, opt)
}

/// `bytes` cut into chunks of at most `room` bytes, in order.
pub fn upload(bytes: &[u8], room: usize) -> Vec<ParamChunk> {
    let total = bytes.len() as u32;
    bytes
        .chunks(room.max(1))
        .map(|part| ParamChunk {
            total,
            bytes: part.to_vec(),
        })
        .collect()
}

/// One download from hop `hop`, reassembled from its chunks in any order.
#[derive(Debug, Clone)]
pub struct Download {
    hop: usize,
    room: usize,
    /// The most bytes this transfer may announce.
    max_total: usize,
    parts: Vec<Option<Vec<u8>>>,
    total: Option<usize>,
    ask: Vec<u32>,
}

impl Download {
    /// A download from hop `hop` in chunks of `room` bytes, announcing at
    /// most `max_total` bytes ([`state_bound`]); the caller asks for chunk
    /// 0.
    pub fn new(hop: usize, room: usize, max_total: usize) -> Self {
        Download {
            hop,
            room: room.max(1),
            max_total,
            parts: Vec::new(),
            total: None,
            ask: Vec::new(),
        }
    }

    /// The hop it comes from.
    pub fn hop(&self) -> usize {
        self.hop
    }

    /// Records chunk `index`; the whole transfer once every chunk is in.
    /// The first chunk announces the total: [`Download::take_requests`]
    /// then names the other chunks to ask for.
    pub fn on_chunk(&mut self, index: u32, chunk: ParamChunk) -> Result<Option<Vec<u8>>, BadReply> {
        if self.total.is_none() {
            let total = chunk.total as usize;
            // A hop cannot make the designer wait for (or hold) more than
            // its stage can have.
            if total > self.max_total {
                return Err(BadReply::Length { hop: self.hop });
            }
            let chunks = total.div_ceil(self.room).max(1);
            self.total = Some(total);
            self.parts = vec![None; chunks];
            self.ask = (1..chunks as u32).collect();
        }
        let slot = self.parts.get_mut(index as usize).ok_or(BadReply::Chunk {
            hop: self.hop,
            chunk: index,
        })?;
        *slot = Some(chunk.bytes);
        if self.parts.iter().any(Option::is_none) {
            return Ok(None);
        }
        let parts = std::mem::take(&mut self.parts);
        let mut all = Vec::with_capacity(parts.iter().flatten().map(Vec::len).sum());
        for part in parts.iter().flatten() {
            all.extend_from_slice(part);
        }
        if Some(all.len()) != self.total {
            return Err(BadReply::Length { hop: self.hop });
        }
        Ok(Some(all))
    }

    /// The chunks to ask for now (after the first chunk: all the others).
    pub fn take_requests(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.ask)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_upload_downloads_back_in_any_order() {
        let bytes: Vec<u8> = (0..=250).collect();
        let chunks = upload(&bytes, 100);
        assert_eq!(chunks.len(), 3);
        let mut d = Download::new(4, 100, 1 << 20);
        assert_eq!(d.on_chunk(0, chunks[0].clone()).unwrap(), None);
        assert_eq!(d.take_requests(), vec![1, 2]);
        assert!(d.take_requests().is_empty());
        assert_eq!(d.on_chunk(2, chunks[2].clone()).unwrap(), None);
        assert_eq!(d.on_chunk(1, chunks[1].clone()).unwrap(), Some(bytes));
    }

    #[test]
    fn an_empty_transfer_is_one_empty_chunk() {
        let mut d = Download::new(0, 10, 1 << 20);
        let got = d
            .on_chunk(
                0,
                ParamChunk {
                    total: 0,
                    bytes: Vec::new(),
                },
            )
            .unwrap();
        assert_eq!(got, Some(Vec::new()));
        assert!(d.take_requests().is_empty());
    }

    #[test]
    fn a_total_above_what_the_stage_can_hold_is_a_bad_reply() {
        let spec = mixnn_model::spec::StageSpec {
            input: mixnn_model::spec::Shape::flat(4),
            ops: vec![mixnn_model::spec::OpSpec::Linear {
                input: 4,
                output: 3,
            }],
        };
        let bound = state_bound(&spec, &mixnn_model::optim::Optimizer::default());
        // Parameters and momentum of a 4 → 3 linear: 2 × 15 floats.
        assert!(bound >= 8 + 2 * 4 * 15);
        let mut d = Download::new(1, 10, bound);
        let huge = ParamChunk {
            total: u32::MAX,
            bytes: vec![0; 10],
        };
        assert_eq!(d.on_chunk(0, huge), Err(BadReply::Length { hop: 1 }));
        assert!(d.take_requests().is_empty(), "nothing asked for a lie");
    }

    #[test]
    fn chunks_past_the_total_or_of_the_wrong_length_are_bad_replies() {
        let mut d = Download::new(2, 10, 1 << 20);
        let chunk = |total: u32, n: usize| ParamChunk {
            total,
            bytes: vec![7; n],
        };
        assert_eq!(d.on_chunk(0, chunk(15, 10)).unwrap(), None);
        assert_eq!(
            d.on_chunk(5, chunk(15, 5)),
            Err(BadReply::Chunk { hop: 2, chunk: 5 })
        );
        // Chunk 1 should hold 5 bytes; 9 make the whole too long.
        assert_eq!(
            d.on_chunk(1, chunk(15, 9)),
            Err(BadReply::Length { hop: 2 })
        );
    }
}
