//! `baton stress`: small versions of every scenario the local stores support, and the
//! proof that the checkers can fail (`noop:`).

use crate::util::Dir;

/// The local stores: kernel locks, lease files, SQLite.
pub fn stores(dir: &Dir) -> Vec<String> {
    vec![
        dir.store(),
        format!("dir:{}?mode=lease", dir.path().join("lease").display()),
        format!("sqlite:{}", dir.path().join("s.db").display()),
    ]
}

fn summary(out: &crate::util::Outcome) -> serde_json::Value {
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout; outcome: {out:#?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("the summary is JSON");
    assert_eq!(v["type"], "summary");
    v
}

#[test]
fn storm_on_noop_fails_naming_the_overlaps() {
    let dir = Dir::new();
    let out = dir
        .bare(&[
            "stress", "storm", "-s", "noop:", "--events", "6", "--stddev", "0.05", "--hold",
            "0.05", "--seed", "7", "-q",
        ])
        .output();
    out.code(1)
        .stdout_has("limit: slot 0 of 'stress/storm' held twice")
        .stdout_has("tokens: token 1 of 'stress/storm' granted twice")
        .stdout_has("replay: baton stress storm -s 'noop:' -k stress/storm --seed 7")
        .one_error_line()
        .stderr_has("violation(s)");
    // The JSON summary lists the same violations, with the processes involved.
    let out = dir
        .bare(&[
            "stress", "storm", "-s", "noop:", "--events", "4", "--stddev", "0", "--hold", "0.05",
            "--json",
        ])
        .output();
    out.code(1);
    let v = summary(&out);
    assert!(v["violation_count"].as_u64().expect("count") > 0, "{v}");
    let first = &v["violations"][0];
    assert_eq!(first["property"], "limit", "{v}");
    assert_eq!(first["pids"].as_array().expect("pids").len(), 2, "{v}");
}

/// Runs `baton stress ARGS` on a faulty noop store and checks that it fails (exit 1)
/// naming `violation`.
fn fails_naming(dir: &Dir, args: &[&str], violation: &str) {
    let out = dir.bare(args).output();
    out.code(1).stdout_has(violation).stderr_has("violation(s)");
}

#[test]
fn falling_or_repeated_tokens_fail_end_to_end() {
    let dir = Dir::new();
    let storm = |store: &str| {
        vec![
            "stress", "storm", "-s", store, "--events", "4", "--stddev", "0.2", "--hold", "0.01",
            "--seed", "2", "-q",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let args = storm("noop:?tokens=falling");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_naming(&dir, &args, "tokens: token of 'stress/storm' did not rise");
    let args = storm("noop:?tokens=repeat");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_naming(
        &dir,
        &args,
        "tokens: token 1 of 'stress/storm' granted twice",
    );
}

#[test]
fn a_broken_resource_fails_the_stale_and_results_checks_end_to_end() {
    // No store fault reaches these two checkers while the fence works (it refuses every
    // lower token, which is what they verify), so the harness's resource is broken on
    // purpose through its test-only fault variable.
    let dir = Dir::new();
    let storm = [
        "stress",
        "storm",
        "-s",
        "noop:?tokens=falling",
        "--events",
        "3",
        "--stddev",
        "0.2",
        "--hold",
        "0.05",
        "--seed",
        "2",
        "-q",
    ];
    // Falling tokens with writes the fence never sees: lower tokens are accepted.
    dir.bare(&storm)
        .env("BATON_STRESS_RESOURCE_FAULT", "unfenced")
        .output()
        .code(1)
        .stdout_has("stale: stale write accepted on 'stress/storm#0'");
    // Results reported written but never committed.
    dir.bare(&[
        "stress", "storm", "-s", "noop:", "--events", "3", "--stddev", "0", "--hold", "0", "-q",
    ])
    .env("BATON_STRESS_RESOURCE_FAULT", "lost-result")
    .output()
    .code(1)
    .stdout_has("results: event 0 (pid")
    .stdout_has("succeeded but has 0 result rows");
}

#[test]
fn a_store_that_never_grants_fails_the_liveness_check() {
    let dir = Dir::new();
    let base = [
        "stress",
        "storm",
        "-s",
        "noop:?acquire=busy",
        "--events",
        "3",
        "--stddev",
        "0",
        "--hold",
        "0",
        "-q",
    ];
    // Waiting forever, every event must be granted.
    fails_naming(&dir, &base, "liveness: event 0 (pid");
    // With a wait, timeouts are legitimate, but not a run without a single grant.
    let mut waiting = base.to_vec();
    waiting.extend(["-w", "10ms"]);
    fails_naming(&dir, &waiting, "liveness: nothing was granted in 3 events");
}

#[test]
fn a_slot_that_never_comes_back_or_comes_back_late_fails_recovery() {
    let dir = Dir::new();
    let crash = |store: &'static str| {
        [
            "stress",
            "crash",
            "-s",
            store,
            "--events",
            "2",
            "--stddev",
            "0",
            "--hold",
            "0.3",
            "--kill-fraction",
            "1",
            "--seed",
            "4",
            "-q",
        ]
    };
    fails_naming(
        &dir,
        &crash("noop:?slot=never-frees"),
        "never came back after pid",
    );
    // Every grant takes 1s: twice the 500ms bound of a store that holds nothing.
    fails_naming(&dir, &crash("noop:?delay=1s"), "(bound 500.000ms)");
}

#[test]
fn a_barrier_that_does_not_wait_fails_end_to_end() {
    let dir = Dir::new();
    // Worker 2 has one job fewer than the others in each stage, so it arrives a whole hold
    // (200ms) before them and, the barrier not waiting, passes and starts the next stage.
    fails_naming(
        &dir,
        &[
            "stress",
            "workflow",
            "-s",
            "noop:?barrier=early",
            "--stages",
            "2",
            "--jobs",
            "8",
            "--workers",
            "8",
            "--procs",
            "3",
            "--hold",
            "200ms",
            "-q",
        ],
        "barrier: stage 0: a party passed at",
    );
}

#[test]
fn a_regrant_before_a_paused_holders_deadline_fails_end_to_end() {
    let dir = Dir::new();
    // noop:?leases=on is a lease store, so the checkers end each lease at its holder's
    // keeper deadline (not at its release); it grants the paused holder's slot at once,
    // long before that deadline.
    fails_naming(
        &dir,
        &[
            "stress",
            "pause",
            "-s",
            "noop:?leases=on",
            "--events",
            "2",
            "--stddev",
            "0",
            "--hold",
            "0.2",
            "--ttl",
            "300ms",
            "--pause-fraction",
            "1",
            "--pause-for",
            "1s",
            "--seed",
            "5",
            "-q",
        ],
        "limit: slot 0 of 'stress/pause' held twice",
    );
}

#[test]
fn storm_passes_on_every_local_store() {
    let dir = Dir::new();
    for store in stores(&dir) {
        let out = dir
            .bare(&[
                "stress", "storm", "-s", &store, "--events", "12", "--stddev", "0.2", "--hold",
                "0.01", "--seed", "1", "--json",
            ])
            .output();
        out.code(0);
        let v = summary(&out);
        assert_eq!(v["violation_count"], 0, "{store}: {v}");
        assert_eq!(v["grants"], 12, "{store}: {v}");
        assert_eq!(v["outcomes"]["ok"], 12, "{store}: {v}");
        assert_eq!(v["seed"], 1);
    }
}

#[test]
fn a_semaphore_storm_passes() {
    let dir = Dir::new();
    for store in stores(&dir) {
        dir.bare(&[
            "stress", "storm", "-s", &store, "-k", "sem", "-n", "3", "--events", "12", "--stddev",
            "0.1", "--hold", "0.05", "-q",
        ])
        .output()
        .code(0)
        .stdout_has("violations            0");
        // Every event was granted and wrote its result (waiting forever, none may give up).
        let out = dir
            .bare(&[
                "stress", "storm", "-s", &store, "-k", "sem", "-n", "3", "--events", "12",
                "--stddev", "0.1", "--hold", "0.05", "--json",
            ])
            .output();
        out.code(0);
        let v = summary(&out);
        assert_eq!(v["grants"], 12, "{store}: {v}");
        assert_eq!(v["outcomes"]["ok"], 12, "{store}: {v}");
        assert_eq!(v["slots"], 3, "{store}: {v}");
    }
}

#[test]
fn crash_kills_holders_and_every_property_holds() {
    let dir = Dir::new();
    for store in stores(&dir) {
        // Each store's documented recovery bound is enforced (500ms for kernel locks, TTL +
        // 1s for the lease stores): a bound, not a speed, so a loaded machine has slack.
        // Probes after every kill and at the end make sure every kill is measured.
        let out = dir
            .bare(&[
                "stress",
                "crash",
                "-s",
                &store,
                "--events",
                "6",
                "--stddev",
                "0.1",
                "--hold",
                "0.1",
                "--ttl",
                "500ms",
                "--kill-fraction",
                "0.5",
                "--seed",
                "3",
                "--json",
            ])
            .output();
        out.code(0);
        let v = summary(&out);
        assert_eq!(v["violation_count"], 0, "{store}: {v}");
        let killed = v["killed"].as_u64().expect("killed");
        assert!(killed >= 1, "{store}: {v}");
        assert_eq!(v["grants"], 6, "{store}: {v}");
        // One probe per kill and one at the end; every kill's slot was measured.
        assert_eq!(v["probes"], killed + 1, "{store}: {v}");
        assert!(v["recovery_ms"]["max_ms"].is_number(), "{store}: {v}");
        assert!(v["recovery_bound_ms"].is_number(), "{store}: {v}");
    }
}

#[test]
fn pause_supersedes_paused_holders_and_the_fence_refuses_them() {
    let dir = Dir::new();
    let lease_stores = &stores(&dir)[1..];
    for store in lease_stores {
        // Every holder is paused early in its hold (after its claim) for far longer than
        // its TTL, and the next one is already waiting (all start at once), so every holder
        // but the last is superseded while stopped and its late write comes after its
        // successor's claim: the fence must refuse it. This holds on every run, whatever
        // the seed; a 1s TTL keeps a loaded machine from losing a lease before the pause.
        let out = dir
            .bare(&[
                "stress",
                "pause",
                "-s",
                store,
                "--events",
                "3",
                "--stddev",
                "0",
                "--hold",
                "0.2",
                "--ttl",
                "1s",
                "--pause-fraction",
                "1",
                "--pause-for",
                "4s",
                "--seed",
                "5",
                "--json",
            ])
            .output();
        out.code(0);
        let v = summary(&out);
        assert_eq!(v["violation_count"], 0, "{store}: {v}");
        assert_eq!(v["paused"], 3, "{store}: {v}");
        assert!(
            v["superseded"].as_u64().expect("superseded") >= 2,
            "{store}: {v}"
        );
        assert!(
            v["fenced_writes"].as_u64().expect("fenced") >= 2,
            "{store}: {v}"
        );
        // Each superseded holder's command (slow to stop) was stopped by its supervisor,
        // and the `stopped` property found it gone by its lease's end.
        assert!(
            v["commands_stopped"].as_u64().expect("commands_stopped")
                >= v["superseded"].as_u64().expect("superseded"),
            "{store}: {v}"
        );
        assert!(
            v["outcomes"]["fenced"].as_u64().unwrap_or(0) >= 2,
            "{store}: {v}"
        );
    }
}

#[test]
fn pause_and_partition_say_what_store_they_need() {
    let dir = Dir::new();
    dir.cmd(&["stress", "pause", "--events", "2"])
        .output()
        .code(69)
        .one_error_line()
        .stderr_has("needs a lease store");
    dir.cmd(&["stress", "partition"])
        .output()
        .code(69)
        .one_error_line()
        .stderr_has("needs a networked store");
}

#[test]
fn workflow_completes_every_job_on_every_local_store() {
    let dir = Dir::new();
    for store in stores(&dir) {
        let out = dir
            .bare(&[
                "stress",
                "workflow",
                "-s",
                &store,
                "--stages",
                "3",
                "--jobs",
                "8",
                "--workers",
                "2",
                "--procs",
                "3",
                "--json",
            ])
            .output();
        out.code(0);
        let v = summary(&out);
        assert_eq!(v["violation_count"], 0, "{store}: {v}");
        assert_eq!(v["outcomes"]["ok"], 24, "{store}: {v}");
        assert!(
            v["stage_transition_ms"]["max_ms"].is_number(),
            "{store}: {v}"
        );
    }
}

#[test]
fn single_records_one_event_and_the_report_is_self_contained() {
    let dir = Dir::new();
    let report = dir.file("report.html");
    let keep = dir.file("run");
    dir.bare(&[
        "stress",
        "single",
        "-s",
        &format!("sqlite:{}", dir.file("s.db").display()),
        "--report",
        report.to_str().expect("utf8"),
        "--dir",
        keep.to_str().expect("utf8"),
        "-q",
    ])
    .output()
    .code(0)
    .stdout_has("events                1 (ok 1)");
    let html = std::fs::read_to_string(&report).expect("the report");
    assert!(html.contains("<svg") && html.contains("Timeline"), "{html}");
    assert!(html.contains("Wait times"), "{html}");
    for external in ["src=", "href=", "<script", "<link"] {
        assert!(!html.contains(external), "{external} in the report: {html}");
    }
    assert!(keep.join("history.jsonl").is_file());
    assert!(keep.join("results.db").is_file());
}

#[test]
fn a_storms_report_shows_its_queue_and_each_wait_by_arrival_in_human_units() {
    let dir = Dir::new();
    let report = dir.file("storm.html");
    dir.bare(&[
        "stress",
        "storm",
        "-s",
        &format!("dir:{}", dir.file("locks").display()),
        "--events",
        "40",
        "--stddev",
        "200ms",
        "--hold",
        "5ms",
        "--report",
        report.to_str().expect("utf8"),
        "-q",
    ])
    .output()
    .code(0);
    let html = std::fs::read_to_string(&report).expect("the report");
    for section in ["Timeline", "Queue depth", "Wait by arrival", "Wait times"] {
        assert!(
            html.contains(&format!("<h2>{section}</h2>")),
            "{section}: {html}"
        );
    }
    // One dot per request, each with its arrival and wait in human units.
    assert_eq!(html.matches("<circle").count(), 40, "{html}");
    assert!(html.contains("aria-label=\"queue depth\""), "{html}");
    // Axis ticks carry units; no raw millisecond floats anywhere.
    assert!(
        html.contains("ms</text>") || html.contains("s</text>"),
        "{html}"
    );
    assert!(!html.contains(" ms<") && !html.contains(".000"), "{html}");
}

#[test]
fn bad_options_are_usage_errors() {
    let dir = Dir::new();
    dir.cmd(&["stress", "crash", "--kill-fraction", "2"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("between 0 and 1");
    dir.cmd(&["stress", "storm", "--hold", "soon"])
        .output()
        .code(2)
        .one_error_line();
    dir.cmd(&["stress", "storm", "--events", "0"])
        .output()
        .code(2)
        .one_error_line();
    dir.cmd(&["stress", "__worker"])
        .output()
        .code(2)
        .stderr_has("internal");
}

/// The networked stores' test servers (`scripts/test` starts them): their URLs, or `None`
/// with a note outside CI. Under `CI=true` a missing server fails the test.
fn networked_stores() -> Vec<String> {
    let mut urls = Vec::new();
    for var in [
        "BATON_TEST_POSTGRES",
        "BATON_TEST_ETCD",
        "BATON_TEST_REDIS",
        "BATON_TEST_ZK",
        "BATON_TEST_AMQP",
    ] {
        match std::env::var(var) {
            Ok(url) if !url.trim().is_empty() => urls.push(url),
            _ if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("CI=true and {var} is not set: run the suite with `bash scripts/test`")
            }
            _ => crate::util::skipped(
                &format!("CLI stress test on {var}"),
                "it is not set (bash scripts/test sets it)",
            ),
        }
    }
    urls
}

#[test]
fn partition_cuts_holders_off_and_the_fence_refuses_them() {
    let dir = Dir::new();
    for store in networked_stores() {
        let key = format!("stress/partition-{}", std::process::id());
        // Both holders are cut off in the first half of a 10s hold, for 6s: longer than the
        // store takes to let the waiter in after a 2s TTL (at most about 3s, with etcd's
        // expiry check or PostgreSQL's TTL of watching), so the first is superseded while
        // cut off, and its successor's claim comes before the first one's late write at
        // the end of its hold, which the fence must refuse. A 2s TTL also keeps a loaded
        // machine from losing a lease before the cut.
        let out = dir
            .bare(&[
                "stress",
                "partition",
                "-s",
                &store,
                "-k",
                &key,
                "--events",
                "2",
                "--stddev",
                "0",
                "--hold",
                "10s",
                "--ttl",
                "2s",
                "--partition-fraction",
                "1",
                "--partition-for",
                "6s",
                "--seed",
                "5",
                "--json",
            ])
            .output();
        out.code(0);
        let v = summary(&out);
        assert_eq!(v["violation_count"], 0, "{store}: {v}");
        assert_eq!(v["partitioned"], 2, "{store}: {v}");
        assert_eq!(v["grants"], 2, "{store}: {v}");
        assert!(
            v["superseded"].as_u64().expect("superseded") >= 1,
            "{store}: {v}"
        );
        assert!(
            v["fenced_writes"].as_u64().expect("fenced") >= 1,
            "{store}: {v}"
        );
        assert!(
            v["commands_stopped"].as_u64().expect("commands_stopped")
                >= v["superseded"].as_u64().expect("superseded"),
            "{store}: {v}"
        );
    }
}

#[test]
fn workflow_meets_at_barriers_on_the_networked_stores() {
    let dir = Dir::new();
    for store in networked_stores() {
        if store.starts_with("amqp:") {
            // The RabbitMQ store has no barriers (its README says why).
            crate::util::skipped("CLI workflow on amqp", "the RabbitMQ store has no barriers");
            continue;
        }
        let key = format!("stress/workflow-{}", std::process::id());
        let out = dir
            .bare(&[
                "stress",
                "workflow",
                "-s",
                &store,
                "-k",
                &key,
                "--stages",
                "2",
                "--jobs",
                "10",
                "--workers",
                "2",
                "--seed",
                "1",
                "--json",
            ])
            .output();
        out.code(0);
        let v = summary(&out);
        assert_eq!(v["violation_count"], 0, "{store}: {v}");
        assert_eq!(v["grants"], 20, "{store}: {v}");
    }
}
