//! Stage states in transit: the chunks of a fetch or a load, and the
//! serialisation of a stage's state (parameters, momentum, step).

use mixnn_model::stage::{NamedParam, StageState};

use crate::{ProtoError, Reader, Result};

/// One chunk of a stage's serialised parameters, as a fetch returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamChunk {
    /// Length of the whole serialisation.
    pub total: u32,
    /// This chunk's bytes.
    pub bytes: Vec<u8>,
}

/// Bytes of a state per chunk when the largest body is `max_body`: the
/// body less the chunk's length field and the seal
/// ([`crate::reply::SEAL_OVERHEAD`]). The designer and every hop cut
/// states with this function.
pub fn chunk_room(max_body: usize) -> usize {
    max_body
        .saturating_sub(4 + crate::reply::SEAL_OVERHEAD)
        .max(1)
}

impl ParamChunk {
    /// Encodes `total ‖ bytes`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.bytes.len());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Decodes a chunk.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "parameter chunk");
        let total = r.u32()?;
        Ok(ParamChunk {
            total,
            bytes: bytes[4..].to_vec(),
        })
    }
}

/// The most bytes [`encode_state`] can take for a stage of `spec`
/// trained with `opt`: every weight, buffer and optimiser buffer, four
/// bytes each, with generous room for names and shapes. The designer caps
/// a download with it before it asks for more chunks, and a hop caps a
/// load.
pub fn state_bound(
    spec: &mixnn_model::spec::StageSpec,
    opt: &mixnn_model::optim::Optimizer,
) -> usize {
    let per_param = 1 + opt.buffers().len();
    let values = spec
        .param_count()
        .saturating_mul(per_param)
        .saturating_add(spec.buffer_count());
    let tensors = 4usize
        .saturating_mul(spec.op_count())
        .saturating_mul(per_param)
        .saturating_add(1);
    (8 + 2usize)
        .saturating_add(values.saturating_mul(4))
        .saturating_add(tensors.saturating_mul(256))
}

/// Serialises a stage's state (a fetch's answer, a load's payload):
/// `steps u64 ‖` [`encode_params`] of its tensors.
pub fn encode_state(state: &StageState) -> Vec<u8> {
    let mut out = state.steps.to_le_bytes().to_vec();
    out.extend_from_slice(&encode_params(&state.tensors));
    out
}

/// Parses [`encode_state`] output.
pub fn decode_state(bytes: &[u8]) -> Result<StageState> {
    let mut r = Reader::new(bytes, "stage state");
    let steps = r.u64()?;
    Ok(StageState {
        steps,
        tensors: decode_params(&bytes[8..])?,
    })
}

/// Serialises parameters: `count u16`, then per tensor `name_len u16 ‖ name
/// ‖ rank u8 ‖ dims u32… ‖ f32…`.
pub fn encode_params(params: &[NamedParam]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(params.len() as u16).to_le_bytes());
    for p in params {
        out.extend_from_slice(&(p.name.len() as u16).to_le_bytes());
        out.extend_from_slice(p.name.as_bytes());
        out.push(p.shape.len() as u8);
        for d in &p.shape {
            out.extend_from_slice(&(*d as u32).to_le_bytes());
        }
        for v in &p.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Parses [`encode_params`] output.
pub fn decode_params(bytes: &[u8]) -> Result<Vec<NamedParam>> {
    let what = "parameters";
    let mut r = Reader::new(bytes, what);
    let n = r.u16()?;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let len = usize::from(r.u16()?);
        let name = String::from_utf8(r.take(len)?.to_vec()).map_err(|_| ProtoError::Invalid {
            what,
            reason: "name is not UTF-8".into(),
        })?;
        let rank = usize::from(r.u8()?);
        let mut shape = Vec::with_capacity(rank);
        let mut count = 1usize;
        for _ in 0..rank {
            let d = r.u32()? as usize;
            count = count.saturating_mul(d);
            shape.push(d);
        }
        let raw = r.take(count.saturating_mul(4))?;
        let values = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push(NamedParam {
            name,
            shape,
            values,
        });
    }
    r.end()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn state_round_trips() {
        let s = StageState {
            steps: 77,
            tensors: vec![NamedParam {
                name: "1.weight.velocity".into(),
                shape: vec![1, 2],
                values: vec![0.5, -1.5],
            }],
        };
        assert_eq!(decode_state(&encode_state(&s)).unwrap(), s);
        assert!(decode_state(&encode_state(&s)[..12]).is_err());
    }

    #[test]
    fn params_round_trip() {
        let p = vec![NamedParam {
            name: "0.weight".into(),
            shape: vec![2, 3],
            values: vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.0],
        }];
        assert_eq!(decode_params(&encode_params(&p)).unwrap(), p);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_params(&bytes);
            let _ = ParamChunk::decode(&bytes);
            let _ = decode_state(&bytes);
        }
    }
}
