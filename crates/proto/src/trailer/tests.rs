use std::collections::HashSet;

use super::*;

fn keys(n: usize) -> Vec<TrailerKeys> {
    (0..n)
        .map(|i| TrailerKeys::new(&[i as u8 + 1; 32]))
        .collect()
}

fn slot(i: usize) -> Slot {
    Slot {
        digest: [0x40 + i as u8; HASH_LEN],
        input: [0x80 + i as u8; HASH_LEN],
        output: [0xc0 + i as u8; HASH_LEN],
    }
}

const CTX: SlotContext = SlotContext {
    step: 7,
    pass: Pass::Forward,
    index: 0,
};

const SEED: [u8; 32] = [9; 32];

fn sent(k: &[TrailerKeys]) -> Vec<u8> {
    let refs: Vec<&TrailerKeys> = k.iter().collect();
    fill(&refs, &CTX, &SEED).unwrap()
}

/// Runs the designer's trailer through the hops, hop `q` changing
/// byte `at` of what it received first; returns the trailer back and
/// what each hop received.
fn through(k: &[TrailerKeys], change: Option<(usize, usize)>) -> (Vec<u8>, Vec<Vec<u8>>) {
    try_through(k, change).unwrap()
}

/// The same; `Err(hop)` if a hop refused what it received.
fn try_through(
    k: &[TrailerKeys],
    change: Option<(usize, usize)>,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), usize> {
    let mut t = sent(k);
    let mut received = Vec::new();
    for (i, key) in k.iter().enumerate() {
        received.push(t.clone());
        if let Some((q, at)) = change {
            if q == i {
                t[at] ^= 0x10;
                // The hop takes what it changed, whatever its tail.
                let tail = key.tail(&CTX);
                t[KEEP_LEN..].copy_from_slice(&tail);
            }
        }
        t = add_layer(key, &CTX, &slot(i), &t).map_err(|_| i)?;
    }
    Ok((t, received))
}

fn open_all(k: &[TrailerKeys], t: &[u8]) -> Opened {
    let refs: Vec<&TrailerKeys> = k.iter().collect();
    open(&refs, &CTX, t, &sent(k)).unwrap()
}

#[test]
fn the_designer_gets_every_hops_slot_in_visit_order() {
    for n in [1, 2, 5, SLOTS] {
        let k = keys(n);
        let (t, received) = through(&k, None);
        assert_eq!(t.len(), TRAILER_LEN);
        let got = open_all(&k, &t);
        let want: Vec<Result<Slot, SlotError>> = (0..n).map(|i| Ok(slot(i))).collect();
        assert_eq!(got.slots, want, "{n} hops");
        // Every hop found its own tail at the end of what it received.
        for (i, r) in received.iter().enumerate() {
            assert_eq!(check_received(&k[i], &CTX, r), Ok(()), "hop {i}");
        }
    }
}

#[test]
fn hops_see_no_common_8_byte_string_and_no_slot() {
    let k = keys(5);
    let (_, received) = through(&k, None);
    let windows =
        |b: &[u8]| -> HashSet<[u8; 8]> { b.windows(8).map(|w| w.try_into().unwrap()).collect() };
    for a in 0..5 {
        for b in a + 1..5 {
            let common = windows(&received[a])
                .intersection(&windows(&received[b]))
                .count();
            assert_eq!(common, 0, "hops {a} and {b}");
        }
        // No hop finds an earlier hop's slot bytes in what it receives.
        for earlier in 0..a {
            let s = slot(earlier);
            let probe: [u8; 8] = s.digest[..8].try_into().unwrap();
            assert!(!windows(&received[a]).contains(&probe));
        }
    }
}

/// Whatever byte hop `q` changes in the trailer it received, and
/// then takes as received, the last layer that fails is hop
/// `q − 1`'s and every later one verifies: the damage is pinned to
/// that pair. (A change in what a later hop drops makes that hop
/// refuse the trailer, unless the culprit is that hop.) On the code
/// before, where a tag covered its own slot only, a byte flipped in
/// hop 1's slot by hop 3 spoiled hop 1's slot alone, and the pair
/// blamed was (1, 2), both honest. Checked for cascades of 5 and of
/// `SLOTS` hops.
#[test]
fn a_change_anywhere_shows_at_the_layer_of_the_hop_before_the_culprit() {
    for n in [5, SLOTS] {
        let k = keys(n);
        for q in [1, 2, n / 2, n - 1] {
            for at in (0..KEEP_LEN).step_by(if n == SLOTS { 173 } else { 41 }) {
                // Bytes the designer does not see again are dropped
                // by later hops, as their tails.
                let seen = TRAILER_LEN - (n - q) * SLOT_LEN;
                let t = match try_through(&k, Some((q, at))) {
                    Ok((t, _)) => t,
                    Err(m) => {
                        assert!(at >= seen && m > q, "hop {m} refused byte {at} of hop {q}");
                        continue;
                    }
                };
                assert!(at < seen, "{n} hops, hop {q}: byte {at} got through");
                let got = open_all(&k, &t).slots;
                let last_bad = got.iter().rposition(Result::is_err);
                assert_eq!(last_bad, Some(q - 1), "{n} hops, hop {q} changed byte {at}");
                for (i, s) in got.iter().enumerate().skip(q) {
                    assert_eq!(*s, Ok(slot(i)), "hop {i}");
                }
            }
        }
    }
    // The first hop changing what the designer sent: its tag covers
    // what it changed, and what it changed carries nothing.
    let k = keys(5);
    let (t, _) = through(&k, Some((0, 9)));
    assert!(open_all(&k, &t).slots.iter().all(Result::is_ok));
    // The last hop's own layer, spoiled: it alone could do that.
    let (mut t, _) = through(&k, None);
    t[3] ^= 1;
    let got = open_all(&k, &t).slots;
    assert_eq!(got.iter().rposition(Result::is_err), Some(4));
}

/// A hop that changes what a later hop will drop gets that hop to
/// refuse the message (not a verdict against anyone).
#[test]
fn a_later_hop_refuses_a_changed_tail() {
    let k = keys(5);
    let mut t = sent(&k);
    t = add_layer(&k[0], &CTX, &slot(0), &t).unwrap();
    // Hop 1 changes a byte that hop 3 would drop, two layers on.
    t[KEEP_LEN - 2 * SLOT_LEN + 4] ^= 1;
    let tail = k[1].tail(&CTX);
    t[KEEP_LEN..].copy_from_slice(&tail);
    t = add_layer(&k[1], &CTX, &slot(1), &t).unwrap();
    t = add_layer(&k[2], &CTX, &slot(2), &t).unwrap();
    assert_eq!(
        add_layer(&k[3], &CTX, &slot(3), &t),
        Err(TrailerError::Tail)
    );
}

#[test]
fn a_slot_of_another_message_does_not_verify() {
    let k = keys(4);
    let refs: Vec<&TrailerKeys> = k.iter().collect();
    let (t, _) = through(&k, None);
    for other in [
        SlotContext { step: 8, ..CTX },
        SlotContext {
            pass: Pass::Backward,
            ..CTX
        },
        SlotContext {
            pass: Pass::Test,
            ..CTX
        },
        SlotContext { index: 1, ..CTX },
    ] {
        let sent = fill(&refs, &other, &SEED).unwrap();
        assert!(open(&refs, &other, &t, &sent)
            .unwrap()
            .slots
            .iter()
            .all(|s| s.is_err()));
    }
    let swapped: Vec<&TrailerKeys> = vec![&k[1], &k[0], &k[2], &k[3]];
    let got = open(&swapped, &CTX, &t, &sent(&k)).unwrap().slots;
    assert!(got[0].is_err() && got[1].is_err());
}

#[test]
fn wrong_lengths_are_refused() {
    let k = keys(1);
    assert_eq!(
        add_layer(&k[0], &CTX, &slot(0), &[0; 10]),
        Err(TrailerError::Length(10))
    );
    let t = sent(&k);
    assert!(open(&[&k[0]], &CTX, &[0; TRAILER_LEN + 1], &t).is_err());
    let many: Vec<&TrailerKeys> = std::iter::repeat_n(&k[0], SLOTS + 1).collect();
    assert!(open(&many, &CTX, &[0; TRAILER_LEN], &t).is_err());
    assert!(fill(&many, &CTX, &SEED).is_err());
}
