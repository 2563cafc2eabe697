//! The test phase of a session: test batches through the cascade (no
//! cache, no update), under commitments like training steps when audits
//! are on: every test output's trailer is checked at delivery, and each
//! hop's opening of a test batch is drawn and re-executed like a step's.

use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{argmax_slice, micro_ranges, Batch};
use mixnn_proto::audit::KEPT;
use mixnn_proto::trailer::Pass;

use super::{decode_opening, malformed, Session};
use crate::error::{BadReply, DesignerError};
use crate::exchange::Fetch;
use crate::plan::opening::{AuditCase, AuditContext, Audited, Verdict};
use crate::plan::pending::{Await, Expected};
use crate::plan::route::Route;

impl Session {
    /// The predicted class of every image of `batches`, through the
    /// cascade's test op (no cache, no update); `on_batch(position)` hears
    /// of each batch done, in order.
    pub fn predict(
        &mut self,
        batches: &[Batch],
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Vec<u32>, DesignerError> {
        self.predict_checked(batches, on_batch)
            .map_err(|e| self.found(e))
    }

    fn predict_checked(
        &mut self,
        batches: &[Batch],
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Vec<u32>, DesignerError> {
        let n = self.layout.len();
        let k = self.micro_batches;
        // A hop keeps the openings of its last KEPT test batches: an
        // audited batch must still be among them when its audit is asked
        // for, after the batches in flight with it.
        let window = if self.audits.on() {
            (self.window * 4).min(KEPT - 1)
        } else {
            self.window * 4
        };
        let step = self.step;
        let mut outputs: Vec<Vec<Option<Vec<u32>>>> = batches
            .iter()
            .map(|b| vec![None; micro_ranges(b.rows, k).len()])
            .collect();
        let (mut next, mut received, mut out) = (0usize, 0usize, 0usize);
        while received < batches.len() {
            // Audits drawn wait for the batches in flight, then run.
            if self.audits.test_queued() {
                if out == 0 {
                    self.run_test_audits(batches)?;
                }
            } else {
                while next < batches.len() && next - received < window {
                    for (m, micro) in batches[next].micro_batches(k).iter().enumerate() {
                        let x = TensorBytes::encode_pixels(
                            &self.layout.input.batched(micro.rows),
                            &micro.pixels,
                        );
                        let body = match &self.kept.first {
                            Some(first) => first.eval_bytes(&x)?,
                            None => x,
                        };
                        let body = self.audits.pad(Pass::Test, step, next as u32, n, &body)?;
                        let what = Await::Test {
                            step,
                            batch: next,
                            micro: m as u16,
                        };
                        self.ex
                            .send(&Route::test(n, step, next as u32), &body, what)?;
                        out += 1;
                    }
                    next += 1;
                }
            }
            if out == 0 {
                continue;
            }
            let (kind, body) = self.ex.wait(Expected::Test, step)?;
            let Await::Test { batch, micro, .. } = kind else {
                return Err(DesignerError::UnexpectedReply {
                    expected: Expected::Test,
                    got: kind,
                });
            };
            out -= 1;
            let body = self.audits.take(kind, body, n)?;
            let classes = self.output_to_classes(&body, step)?;
            let slot = outputs
                .get_mut(batch)
                .and_then(|o| o.get_mut(usize::from(micro)))
                .ok_or(BadReply::TestOutput { batch, micro })?;
            *slot = Some(classes);
            self.audits.test_done(step, batch as u32, n);
            while received < batches.len() && outputs[received].iter().all(Option::is_some) {
                on_batch(received);
                received += 1;
            }
        }
        if self.audits.test_queued() {
            self.run_test_audits(batches)?;
        }
        Ok(outputs.into_iter().flatten().flatten().flatten().collect())
    }

    /// The classes a test output `body` of the last hop gives (through
    /// the kept last stage, if any).
    fn output_to_classes(&self, body: &[u8], step: u64) -> Result<Vec<u32>, DesignerError> {
        // Only the last hop delivers test outputs.
        let end = self.layout.len().saturating_sub(1);
        let bad = |e: &dyn std::fmt::Display| malformed(end, step, format!("its test output: {e}"));
        let mut out = TensorBytes::decode(body).map_err(|e| bad(&e))?;
        if let Some(last) = &self.kept.last {
            let x = out.into_batch(&last.spec().input).map_err(|e| bad(&e))?;
            let y = last.forward_eval(x).map_err(|e| bad(&e))?;
            out = TensorBytes {
                shape: y.dims().to_vec(),
                values: y.into_vec(),
            };
        }
        match out.shape.as_slice() {
            [rows, cols] if rows * cols == out.values.len() => {
                Ok(argmax_slice(&out.values, *rows, *cols))
            }
            other => Err(bad(&format!("shape {other:?}"))),
        }
    }

    /// Runs the test audits waiting (no test batch in flight): each
    /// hop's opening of its test batch and its neighbours', checked
    /// against their slots and re-executed.
    fn run_test_audits(&mut self, batches: &[Batch]) -> Result<(), DesignerError> {
        for ((step, batch), hop) in self.audits.take_test_queue() {
            let of = Audited::Test { step, batch };
            let mut case = AuditCase::of(hop, of, &self.layout);
            let asks = case.asks().to_vec();
            let max: Vec<usize> = asks.iter().map(|&k| self.opening_bound(k)).collect();
            let got =
                self.ex
                    .download(&asks, &max, Fetch::TestOpening { step, batch }, self.step)?;
            let b = batches.get(batch as usize).ok_or(BadReply::TestOutput {
                batch: batch as usize,
                micro: 0,
            })?;
            let ctx = AuditContext {
                layout: &self.layout,
                optimizer: self.cfg.optimizer,
                seed: &self.cfg.seed,
                batch: b,
            };
            let mut verdict = Verdict::Pass;
            for bytes in &got {
                if let Some(v) = case.on_opening(&self.audits, &ctx, decode_opening(bytes)) {
                    verdict = v;
                    break;
                }
            }
            match verdict {
                Verdict::Pass => self.audits.record(None),
                Verdict::Fail(m) => return Err(DesignerError::Misbehaved(m)),
            }
        }
        Ok(())
    }
}
