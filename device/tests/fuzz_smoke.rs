//! Drives the fuzz harness body with deterministic pseudo-random inputs so
//! CI exercises it without nightly or cargo-fuzz.

use faultline_device::harness;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[test]
fn harness_survives_pseudo_random_inputs() {
    let n: usize = std::env::var("FAULTLINE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut seed = 0x5EED_F00D_u64;
    let mut max_len = 0;
    for case in 0..n {
        let len = (xorshift(&mut seed) % 600) as usize;
        max_len = max_len.max(len);
        let data: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
        // A panic here names the case for reproduction.
        let r = std::panic::catch_unwind(|| harness::run(&data));
        assert!(r.is_ok(), "harness panicked on case {case} (len {len})");
    }
    assert!(max_len > 500);
}

#[test]
fn harness_handles_degenerate_inputs() {
    harness::run(&[]);
    harness::run(&[0xFF; 4096]);
    harness::run(&[0x00; 4096]);
    let ramp: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    harness::run(&ramp);
}
