//! Test vectors for the routing-block and address encodings, both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_wire::*;

const BLOCK_HOP: &str = concat!(
    "020000",                                 // op=2 (backward), next=hop, flags=0
    "04cb0071070000000000000000000000001b59", // 203.0.113.7:7001
    "11111111111111111111111111111111",       // tag
    "22222222222222222222222222222222",       // next MAC
    "3333333333333333333333333333333333333333333333333333333333333333", // next prefix
    "00000000000000000000000000000000",       // reply id (none)
    "00000000000000000000000000000000",       // new session (none)
    "00000000000000000000",                   // reserved
);
const BLOCK_DELIVER: &str = concat!(
    "000101",                                 // op=0 (init), next=deliver, flags=new session
    "0620010db80000000000000000000000010fa0", // [2001:db8::1]:4000
    "55555555555555555555555555555555",       // tag
    "00000000000000000000000000000000",       // next MAC (none)
    "0000000000000000000000000000000000000000000000000000000000000000", // next prefix (none)
    "44444444444444444444444444444444",       // reply id
    "66666666666666666666666666666666",       // new session id
    "00000000000000000000",                   // reserved
);

fn check(hex_str: &str, expected: BlockPlaintext) {
    let bytes: [u8; BLOCK_LEN] = hex::decode(hex_str).unwrap().try_into().unwrap();
    let decoded = BlockPlaintext::decode(&bytes).unwrap();
    assert_eq!(decoded, expected);
    assert_eq!(hex::encode(decoded.encode()), hex_str);
}

#[test]
fn testvec_forwarding_block_ipv4() {
    check(
        BLOCK_HOP,
        BlockPlaintext {
            block: RoutingBlock {
                op: Op::Backward,
                next: Next::Hop(HopAddr("203.0.113.7:7001".parse().unwrap())),
                tag: HopTag([0x11; 16]),
            },
            next_mac: [0x22; 16],
            next_prefix: [0x33; 32],
            new_session: None,
        },
    );
}

#[test]
fn testvec_init_delivery_block_ipv6() {
    check(
        BLOCK_DELIVER,
        BlockPlaintext {
            block: RoutingBlock {
                op: Op::Init,
                next: Next::Deliver {
                    addr: HopAddr("[2001:db8::1]:4000".parse().unwrap()),
                    reply_id: ReplyId([0x44; 16]),
                },
                tag: HopTag([0x55; 16]),
            },
            next_mac: [0; 16],
            next_prefix: [0; 32],
            new_session: Some(SessionId([0x66; 16])),
        },
    );
}

#[test]
fn testvec_addresses() {
    for (text, hex_str) in [
        ("203.0.113.7:7001", "04cb0071070000000000000000000000001b59"),
        (
            "[2001:db8::1]:4000",
            "0620010db80000000000000000000000010fa0",
        ),
    ] {
        let addr = HopAddr(text.parse().unwrap());
        let bytes: [u8; ADDR_LEN] = hex::decode(hex_str).unwrap().try_into().unwrap();
        assert_eq!(HopAddr::decode(&bytes).unwrap(), addr);
        assert_eq!(hex::encode(addr.encode()), hex_str);
    }
}
