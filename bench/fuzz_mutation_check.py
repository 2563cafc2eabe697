#!/usr/bin/env python3
"""Mutation check of the byzantine fuzzer (docs/threat-model/binding.md).

Each check of the designer is removed in turn by one edit, the short fuzz
run (crates/integration/tests/fuzz.rs, fuzz_short) runs, and the file is
restored from git: the run must fail every time. Run from the repository
root with a clean crates/designer/src:

    python3 bench/fuzz_mutation_check.py [INDEX ...]

One line per check: whether the fuzzer caught it, by which trial.
"""
import re
import subprocess
import sys
import time

# Each mutation: (name, file, old, new). Applied one at a time.
M = [
 ("ledger: trailer layer tags", "crates/designer/src/plan/ledger.rs",
  "        if let Some(at) = opened.slots.iter().rposition(Result::is_err) {\n            let hop = order[at];",
  "        if opened.slots.iter().any(Result::is_err) {\n            return Ok(payload.to_vec());\n        }\n        if let Some(at) = None::<usize> {\n            let hop = order[at];"),
 ("ledger: first hop's input = what the designer sent", "crates/designer/src/plan/ledger.rs",
  "if sent_hash.is_some_and(|h| h != slots[0].input) {", "if false && sent_hash.is_some_and(|h| h != slots[0].input) {"),
 ("ledger: boundary between two hops", "crates/designer/src/plan/ledger.rs",
  "if pair[0].output != pair[1].input {", "if false && pair[0].output != pair[1].input {"),
 ("ledger: last hop's output = what it delivered", "crates/designer/src/plan/ledger.rs",
  "if slots[slots.len() - 1].output != hash_tensor(payload) {", "if false && slots[slots.len() - 1].output != hash_tensor(payload) {"),
 ("ledger: state chain (forward, test)", "crates/designer/src/plan/ledger.rs",
  "if want != slot.digest {", "if false && want != slot.digest {"),
 ("ledger: state chain (backward after the next forward)", "crates/designer/src/plan/ledger.rs",
  "if next.is_some_and(|f| f.digest != slot.digest) {", "if false && next.is_some_and(|f| f.digest != slot.digest) {"),
 ("session: known state built at init", "crates/designer/src/session.rs",
  "                self.audits\n                    .know(k, n.start_step, digest_state(&stage.state()));",
  "                let _ = (k, digest_state(&stage.state()));"),
 ("session: known state loaded", "crates/designer/src/session.rs",
  "            self.audits.know(*j, c.step, state_digest(bytes));", "            let _ = (j, bytes);"),
 ("session: fetched state = known state", "crates/designer/src/session.rs",
  "if state_digest(bytes) != want {", "if false && state_digest(bytes) != want {"),
 ("opening: fields against the slots", "crates/designer/src/plan/opening.rs",
  "    o.check(&fwd, &bwd)?;", "    let _ = o.check(&fwd, &bwd);"),
 ("opening: re-executed output", "crates/designer/src/plan/opening.rs",
  "    if y != o.y {\n        return Err(\"forward output", "    if false && y != o.y {\n        return Err(\"forward output"),
 ("opening: re-executed input gradient", "crates/designer/src/plan/opening.rs",
  "if dx != o.g_out {", "if false && dx != o.g_out {"),
 ("opening: re-executed state after", "crates/designer/src/plan/opening.rs",
  "if state_digest(&encode_state(&stage.state())) != o.after {", "if false && state_digest(&encode_state(&stage.state())) != o.after {"),
 ("opening: test fields against the slot", "crates/designer/src/plan/opening.rs",
  "    o.check_test(&slot)?;", "    let _ = o.check_test(&slot);"),
 ("opening: re-executed test output", "crates/designer/src/plan/opening.rs",
  "    if y != o.y {\n        return Err(\"test output", "    if false && y != o.y {\n        return Err(\"test output"),
 ("opening: a refusal fails", "crates/designer/src/plan/opening.rs",
  "        let Some(o) = opening else {\n            return fail(",
  "        let Some(o) = opening else {\n            return self.next().is_none().then_some(Verdict::Pass);\n        };\n        #[allow(unreachable_code)]\n        let Some(o) = Some(o) else {\n            return fail("),
 ("exchange: chunk plaintext parses", "crates/designer/src/exchange.rs",
  "        let piece = ParamChunk::decode(&body).map_err(|e| {\n            found(\n                Culprit::Hop(hop),\n                format!(\"chunk {chunk} of its {words}: {e}\"),\n            )\n        })?;",
  "        let piece = ParamChunk::decode(&body)?;"),
 ("runner: a pair replaces nobody", "crates/designer/src/runner.rs",
  "                self.replace_and_rebuild(&[], step, &reason, &c)?;",
  "                self.replace_and_rebuild(&culprit.suspects(), step, &reason, &c)?;"),
 ("runner: the same suspects twice stop the run", "crates/designer/src/runner.rs",
  "                if *seen > 1 {", "                if *seen > 100 {"),
 ("recovery: dead only if neither end reaches it", "crates/designer/src/plan/recovery.rs",
  "        let last = self.from_last.iter().rposition(|b| !b);", "        let last = first;"),
]


def main():
    picked = [int(a) for a in sys.argv[1:]] or range(len(M))
    dirty = subprocess.run(["git", "status", "--porcelain", "crates/designer/src"],
                           capture_output=True, text=True).stdout
    if dirty.strip():
        sys.exit("crates/designer/src has changes: commit or stash them first")
    for i in picked:
        name, path, old, new = M[i]
        text = open(path).read()
        if text.count(old) != 1:
            print(f"{name} | edit not found")
            continue
        open(path, "w").write(text.replace(old, new))
        start = time.time()
        try:
            run = subprocess.run(
                ["cargo", "test", "-p", "mixnn-integration", "--test", "fuzz",
                 "fuzz_short", "--", "--nocapture"],
                env={**__import__("os").environ, "MIXNN_FUZZ_FAIL_FAST": "1"},
                capture_output=True, text=True)
        finally:
            subprocess.run(["git", "checkout", "-q", "--", path])
        log = run.stdout + run.stderr
        if "error[" in log:
            verdict = "BUILD ERROR"
        elif run.returncode == 0:
            verdict = "NOT CAUGHT"
        else:
            hit = re.search(r"^trial (\d+): .*VIOLATIONS (.*)$", log, re.M)
            verdict = f"caught by trial {hit.group(1)}: {hit.group(2)[:120]}" if hit else "failed"
        print(f"{name} | {verdict} | {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
