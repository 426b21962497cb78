//! libFuzzer target: `sniff` on arbitrary first bytes must never panic, and may only ask
//! for more while below its bound.
#![no_main]

use agent_egress::sniff::{sniff, Sniff};
use libfuzzer_sys::fuzz_target;

const MAX_BYTES: usize = 16384;

fuzz_target!(|data: &[u8]| {
    if sniff(data, MAX_BYTES) == Sniff::NeedMore {
        assert!(data.len() < MAX_BYTES, "NeedMore at {} bytes", data.len());
    }
});
