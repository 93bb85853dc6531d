//! Boots the real firmware (built by scripts/build-firmware.sh) in faultline.

mod common;

use common::*;

/// Boots the firmware with `extra` arguments after `--firmware`; a 400 s
/// timeout unless `extra` gives one. The whole default suite takes ~110 s
/// alone under PVM, most of it the SVM suite's large_first_touch (65,536
/// GPU first-touch faults serviced by emulated guest code); cargo runs these
/// boots in parallel on shared cores, so leave a wide margin.
fn boot(fw: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "--firmware", path_str(fw)];
    if !extra.contains(&"--timeout") {
        args.extend(["--timeout", "400"]);
    }
    args.extend_from_slice(extra);
    faultline(&args)
}

/// The `N passed, M failed` line the firmware's test runner ends with.
fn summary(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().rev().find(|l| l.contains(" passed, "))?;
    let mut words = line.split_whitespace();
    let p = words.next()?.parse().ok()?;
    let f = words.nth(1)?.parse().ok()?;
    Some((p, f))
}

#[test]
fn default_suite_passes() {
    let (true, Some(fw)) = (kvm_or_skip("default_suite_passes"), firmware()) else {
        return;
    };
    let o = boot(&fw, &[]);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        stderr(&o)
    );
    let (p, f) = summary(&out).expect("summary line");
    assert!(p >= 4, "at least 4 self-tests: {out}");
    assert_eq!(f, 0);
    assert!(out.trim_end().ends_with(&format!("{p} passed, 0 failed")));
    for t in ["frame_alloc", "heap", "direct_map", "timer_monotonic"] {
        assert!(
            out.contains(&format!("test {t} ... ok")),
            "{t} missing:\n{out}"
        );
    }
    // A run that passed must look like it: the device errors the bad-input
    // tests provoke on purpose are counted, not printed as warnings.
    let err = stderr(&o);
    assert!(
        !err.lines().any(|l| l.contains("warn")),
        "a passing default suite printed warnings:\n{err}"
    );
}

#[test]
fn failing_guest_test_makes_faultline_fail() {
    let (true, Some(fw)) = (kvm_or_skip("failing_guest_test"), firmware()) else {
        return;
    };
    let o = boot(&fw, &["--cmdline", "fail=1"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}");
    assert!(out.contains("test deliberate_failure ... FAILED"), "{out}");
    assert_eq!(summary(&out).map(|s| s.1), Some(1));
    assert!(stderr(&o).contains("guest reported failure"));
}

/// The firmware finds the VMM's line console (port 0xe0) and prints
/// through it: "\n" line ends (COM1 output has "\r\n"), and it says so at
/// debug level. The full output must still arrive, summary last.
#[test]
fn console_goes_through_the_line_console() {
    let (true, Some(fw)) = (kvm_or_skip("console_line_console"), firmware()) else {
        return;
    };
    let o = boot(&fw, &["--cmdline", "test=heap loglevel=debug"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("[DEBUG] console: line console (port 0xe0)"),
        "{out}"
    );
    assert!(!out.contains('\r'), "COM1 line ends in: {out:?}");
    assert!(out.contains("test heap ... ok"), "{out}");
    assert_eq!(summary(&out), Some((1, 0)), "{out}");
}

/// `list=1` alone prints the listing assembled at build time; with an
/// empty `test=` the names are printed one by one at run time. Both must
/// be the same lines, one per test, after the banner.
#[test]
fn the_built_listing_matches_the_run_time_one() {
    let (true, Some(fw)) = (kvm_or_skip("listing"), firmware()) else {
        return;
    };
    let names = |cmdline: &str| {
        let o = boot(&fw, &["--cmdline", cmdline]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(0), "{out}");
        let (_, list) = out
            .split_once("faultline firmware:")
            .and_then(|(_, rest)| rest.split_once('\n'))
            .unwrap_or_else(|| panic!("no banner in {out}"));
        list.lines().map(str::to_owned).collect::<Vec<_>>()
    };
    let built = names("list=1");
    assert!(built.len() > 40, "{built:?}");
    assert!(built.iter().any(|n| n == "large_first_touch"), "{built:?}");
    assert_eq!(built, names("list=1 test="));
}

#[test]
fn test_filter_and_unknown_keys() {
    let (true, Some(fw)) = (kvm_or_skip("test_filter"), firmware()) else {
        return;
    };
    let o = boot(&fw, &["--cmdline", "test=heap bogus=1"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(summary(&out), Some((1, 0)), "{out}");
    assert!(out.contains("test heap ... ok"));
    assert!(out.contains("unknown key 'bogus'"), "{out}");
}

#[test]
fn boots_with_ram_above_4g_and_several_vcpus() {
    let (true, Some(fw)) = (kvm_or_skip("boots_with_high_ram"), firmware()) else {
        return;
    };
    // 3 GiB below the MMIO hole plus 64 MiB above 4 GiB. The firmware's
    // memory bring-up time grows with RAM, hence the generous timeout.
    let o = boot(
        &fw,
        &[
            "--memory",
            "3136M",
            "--vcpus",
            "2",
            "--cmdline",
            "test=direct_map,smp cpus=2",
            "--timeout",
            "240",
        ],
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    // All RAM but the legacy 0x9fc00..1 MiB window is usable.
    assert!(out.contains("3135 MiB RAM"), "{out}");
    assert!(out.contains("test direct_map ... ok"), "{out}");
    // Both vCPUs came up (the MADT lists them) and ran calls sent by IPI.
    assert!(out.contains("cpus: 2 of 2 online"), "{out}");
    assert!(out.contains("test smp ... ok"), "{out}");
}

/// At `--memory 16M` (the smallest the VMM accepts) every test either runs
/// or fails up front with one line naming what it needs; none fails with
/// what running out of memory would give (a cancelled command, an
/// allocation error). The largest need is `large_first_touch`'s 320 MiB;
/// README gives the suite's minimum `--memory` from it.
#[test]
fn too_small_a_guest_says_what_each_test_needs() {
    let (true, Some(fw)) = (kvm_or_skip("too_small_a_guest"), firmware()) else {
        return;
    };
    let o = boot(&fw, &["--memory", "16M"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", stderr(&o));
    let (p, f) = summary(&out).expect("summary line");
    let results: Vec<&str> = out.lines().filter(|l| l.starts_with("test ")).collect();
    assert_eq!(results.len() as u32, p + f, "{out}");
    let mut needs = 0;
    for l in &results {
        if l.ends_with(" ... ok") {
            continue;
        }
        let (_, why) = l
            .split_once(" ... FAILED: ")
            .unwrap_or_else(|| panic!("{l}"));
        let mib = why
            .strip_prefix("needs ≥ ")
            .and_then(|w| w.split_once(" MiB of guest memory, "))
            .and_then(|(n, rest)| Some((n.parse::<u64>().ok()?, rest)));
        let Some((n, rest)) = mib else {
            panic!("a failure that is not a memory need: {l}\n{out}");
        };
        let free: u64 = rest
            .strip_suffix(" MiB free; boot with more --memory")
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{l}"));
        assert!(n > free, "a need that fits is not a reason to fail: {l}");
        needs += 1;
    }
    assert!(needs > 0 && needs == f, "{out}");
    assert!(
        out.contains("test large_first_touch ... FAILED: needs ≥ 320 MiB of guest memory"),
        "{out}"
    );
}

/// `--results` writes one JUnit test case per guest test line, with the
/// guest's failure message, and keeps the guest's exit status.
#[test]
fn results_are_junit_with_one_case_per_guest_test() {
    let (true, Some(fw)) = (kvm_or_skip("results_junit"), firmware()) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("faultline-results-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pass = dir.join("pass.xml");
    let o = boot(
        &fw,
        &["--cmdline", "test=heap", "--results", path_str(&pass)],
    );
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", stderr(&o));
    let xml = std::fs::read_to_string(&pass).unwrap();
    assert!(xml.starts_with("<?xml"), "{xml}");
    assert!(xml.contains("tests=\"1\" failures=\"0\""), "{xml}");
    assert!(
        xml.contains("<testcase classname=\"faultline.guest\" name=\"heap\""),
        "{xml}"
    );

    let fail = dir.join("fail.xml");
    let o = boot(
        &fw,
        &[
            "--cmdline",
            "fail=1 test=deliberate",
            "--results",
            path_str(&fail),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "stderr:\n{}", stderr(&o));
    let xml = std::fs::read_to_string(&fail).unwrap();
    assert!(xml.contains("tests=\"1\" failures=\"1\""), "{xml}");
    assert!(
        xml.contains("name=\"deliberate_failure\"")
            && xml.contains("<failure message=\"deliberate failure requested by fail=1\"/>"),
        "{xml}"
    );
    assert!(!xml.contains("faultline.run"), "the guest said why: {xml}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SVM tests' driver statistics (their `stats` console lines) reach
/// `--stats-json` per test and summed, and `--results` as properties.
#[test]
fn stats_json_and_results_carry_the_guest_drivers_stats() {
    let (true, Some(fw)) = (kvm_or_skip("guest_stats"), firmware()) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("faultline-gstats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, xml) = (dir.join("s.json"), dir.join("r.xml"));
    // Each output on its own: either alone must read the console.
    let cmdline = ["--cmdline", "test=anon_read_prot"];
    let o = boot(
        &fw,
        &[&cmdline[..], &["--stats-json", path_str(&json)]].concat(),
    );
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", stderr(&o));
    let o = boot(&fw, &[&cmdline[..], &["--stats"]].concat());
    let err = stderr(&o);
    assert!(
        err.contains("guest driver, 1 test(s) (latencies: count total_us max_us):")
            && err.contains("  window.64k  "),
        "{err}"
    );
    let doc = stats_doc(&json);
    let t = &doc["guest"]["tests"]["anon_read_prot"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{doc:#}"));
    // Its mappings are 64 KiB at the default 64 KiB fault-around: every
    // window is in the 64k cells, and every replay in the replay cell.
    let c = &t["counters"];
    let windows = n(&c["windows"]);
    assert!(windows >= 1, "{doc:#}");
    let l = &t["latency"];
    assert_eq!(n(&l["window.64k"]["count"]), windows, "{doc:#}");
    assert_eq!(n(&l["pte_write.64k"]["count"]), windows, "{doc:#}");
    let retries = c["retries"].as_u64().unwrap_or(0);
    assert_eq!(
        n(&l["range_fault.64k"]["count"]),
        windows + retries,
        "{doc:#}"
    );
    assert_eq!(n(&l["replay"]["count"]), n(&c["replays"]), "{doc:#}");
    let w = &l["window.64k"];
    assert!(
        0 < n(&w["max_us"]) && n(&w["max_us"]) <= n(&w["total_us"]),
        "{doc:#}"
    );
    assert!(
        t["policy"].as_str().unwrap().contains("replay=batch"),
        "{doc:#}"
    );
    assert_eq!(doc["guest"]["total"]["latency"], *l, "one test: {doc:#}");
    let o = boot(
        &fw,
        &[&cmdline[..], &["--results", path_str(&xml)]].concat(),
    );
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", stderr(&o));
    let xml = std::fs::read_to_string(&xml).unwrap();
    assert!(
        xml.contains(&format!(
            "<property name=\"window.64k.count\" value=\"{windows}\"/>"
        )),
        "{xml}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
