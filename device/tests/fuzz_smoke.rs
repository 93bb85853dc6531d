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
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    for case in 0..n {
        let len = (xorshift(&mut seed) % 600) as usize;
        max_len = max_len.max(len);
        let data: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
        // A panic here names the case for reproduction.
        let r = std::panic::catch_unwind(|| harness::run_with(&data, None));
        let Ok(named) = r else {
            panic!("harness panicked on case {case} (len {len})");
        };
        for (k, v) in named {
            *seen.entry(k).or_default() += v;
        }
    }
    assert!(max_len > 500);
    // The programs reach MIGRATE and VRAM leaves, and their failures.
    for k in [
        "lifetime.cmd_migrate",
        "lifetime.bytes_migrated",
        "lifetime.status_BadVram",
        "lifetime.status_BadList",
        "vram.touched_bytes",
    ] {
        assert!(seen.get(k).is_some_and(|v| *v > 0), "{k}: {seen:?}");
    }
}

/// The same programs on a device with every fault-injection knob on
/// (delays of 1 µs, so deadlines pass between the harness's steps), a
/// different seed per case.
#[test]
fn harness_survives_pseudo_random_inputs_under_injection() {
    let mut seed = 0x1A7E_C7ED_u64;
    let mut fired = std::collections::BTreeMap::<String, u64>::new();
    for case in 0..1500u64 {
        let len = (xorshift(&mut seed) % 600) as usize;
        let data: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
        let spec: faultline_device::InjectSpec = format!(
            "seed={case},tlb_ack_delay_steps=3,tlb_ack_delay_us=1,fault_msi_delay_us=1,\
             fault_reorder=1,fault_dup=0.3,spurious=0.2,fault_overflow_at=3,\
             engine_stall_us=1,engine_stall=0.3"
        )
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
        let r = std::panic::catch_unwind(|| harness::run_with(&data, Some(spec)));
        let Ok(named) = r else {
            panic!("harness panicked on case {case} (len {len})");
        };
        for (k, v) in named {
            if let Some(knob) = k.strip_prefix("inject.fired.") {
                *fired.entry(knob.to_string()).or_default() += v;
            }
        }
    }
    // Every knob fired somewhere, or this proved nothing about it.
    assert_eq!(fired.len(), faultline_device::inject::KNOB_NAMES.len());
    for (knob, n) in &fired {
        assert!(*n > 0, "{knob} never fired: {fired:?}");
    }
}

#[test]
fn harness_handles_degenerate_inputs() {
    harness::run(&[]);
    harness::run(&[0xFF; 4096]);
    harness::run(&[0x00; 4096]);
    let ramp: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    harness::run(&ramp);
}
