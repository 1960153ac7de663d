//! The command line over `--sim`: output, exit codes, and golden `inspect` output. Each test runs
//! [`run`](crate::run), the binary's whole code, in-process (see the crate documentation for
//! why not a spawned binary).

use std::path::{Path, PathBuf};

struct Output {
    code: u8,
    stdout: String,
    stderr: String,
}

/// Runs `vmbsrvctl ARGS`; every `@NAME` argument is a path in `dir`.
fn vmbsrvctl(args: &[&str], dir: &Path) -> Output {
    let args =
        std::iter::once("vmbsrvctl".to_string()).chain(args.iter().map(
            |a| match a.strip_prefix('@') {
                Some(name) => dir.join(name).display().to_string(),
                None => (*a).to_string(),
            },
        ));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = crate::run(args, &mut out, &mut err, false);
    let strip = |bytes: Vec<u8>| {
        String::from_utf8_lossy(&bytes).replace(&format!("{}/", dir.display()), "")
    };
    Output {
        code,
        stdout: strip(out),
        stderr: strip(err),
    }
}

fn stdout(output: &Output) -> String {
    output.stdout.clone()
}

fn stderr(output: &Output) -> String {
    output.stderr.clone()
}

fn code(output: &Output) -> u8 {
    output.code
}

/// A fresh scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmbsrvctl-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn package() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn sim_demo_reports_exactly_once_and_inspect_reads_every_delivery() {
    let dir = scratch("demo");
    let out = vmbsrvctl(&["--sim", "demo", "--to", "@demo.vbss"], &dir);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.ends_with("verdict: exactly once\n"), "{text}");
    assert!(
        text.contains("ledger: 18 posted, 18 delivered, 0 lost, 0 duplicated, 0 corrupted"),
        "{text}"
    );
    assert!(
        text.contains("10 in-flight deliveries handed over (Migrated)"),
        "{text}"
    );

    let out = vmbsrvctl(&["inspect", "@demo.vbss"], &dir);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("  delivery @").count(), 10, "{text}");
    for sequence in 7..=16 {
        assert!(
            text.contains(&format!("sequence {sequence}, tag {}", sequence - 1)),
            "{text}"
        );
    }
    assert!(
        text.contains(
            "summary: 3 frames, channel record ok, 10 delivery records, 0 defects: clean"
        )
    );
}

#[test]
fn sim_demo_json() {
    let dir = scratch("demo-json");
    let out = vmbsrvctl(
        &[
            "--sim",
            "--json",
            "demo",
            "--burst",
            "5",
            "--ack",
            "5",
            "--to",
            "@vmbsrv-demo.vbss",
        ],
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["demo"]["exactly_once"], true);
    assert_eq!(value["demo"]["migrated"], 0);
    assert!(dir.join("vmbsrv-demo.vbss").exists());
}

#[test]
fn inspect_golden_text_and_json() {
    let out = vmbsrvctl(&["inspect", "@tests/fixtures/demo.vbss"], &package());
    assert_eq!(code(&out), 0);
    let golden = std::fs::read_to_string(package().join("tests/golden/inspect-demo.txt")).unwrap();
    assert_eq!(stdout(&out), golden);

    let out = vmbsrvctl(
        &["--json", "inspect", "@tests/fixtures/demo.vbss"],
        &package(),
    );
    assert_eq!(code(&out), 0);
    let found: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(package().join("tests/golden/inspect-demo.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(found, golden);
}

#[test]
fn inspect_explains_a_damaged_delivery_record_golden() {
    let dir = scratch("damaged");
    let mut bytes = std::fs::read(package().join("tests/fixtures/demo.vbss")).unwrap();
    bytes[330] ^= 1; // inside the first delivery record (offset 314)
    std::fs::write(dir.join("damaged.vbss"), &bytes).unwrap();
    let out = vmbsrvctl(&["inspect", "@damaged.vbss"], &dir);
    assert_eq!(code(&out), 6, "defects: exit code 6");
    let golden =
        std::fs::read_to_string(package().join("tests/golden/inspect-damaged.txt")).unwrap();
    assert_eq!(stdout(&out), golden);
    assert!(stderr(&out).contains("3 defect(s)"));
}

#[test]
fn inspect_refuses_hostile_files_cleanly() {
    let dir = scratch("hostile");
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("empty.vbss", Vec::new(), "defect @0: stream.magic"),
        (
            "text.vbss",
            b"hello world, not a stream".to_vec(),
            "found \"hell\"",
        ),
        (
            "huge-frame.vbss",
            {
                let mut b = b"VBSS\x01\x00\x00\x00".to_vec();
                b.extend_from_slice(&[0, 0, 0, 0, 2, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
                b
            },
            "defect @16: frame.len: expected at most 16777216, found 4294967295",
        ),
        (
            "version.vbss",
            b"VBSS\x09\x00\x00\x00".to_vec(),
            "defect @4: stream.version: expected 1, found 9",
        ),
    ];
    for (name, bytes, needle) in cases {
        std::fs::write(dir.join(name), bytes).unwrap();
        let at = format!("@{name}");
        let out = vmbsrvctl(&["inspect", &at], &dir);
        assert_eq!(code(&out), 6, "{name}");
        assert!(stdout(&out).contains(needle), "{name}: {}", stdout(&out));
    }
    let out = vmbsrvctl(&["inspect", "@missing.vbss"], &dir);
    assert_eq!(code(&out), 5, "a missing file: exit code 5");
}

#[test]
fn sim_commands_and_exit_codes() {
    let dir = scratch("commands");
    let out = vmbsrvctl(&["--sim", "info"], &dir);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("control version 1\n"));

    let out = vmbsrvctl(&["--sim", "--json", "stats"], &dir);
    assert_eq!(code(&out), 0);
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["statistics"]["phase"], "Running");

    let out = vmbsrvctl(
        &[
            "--sim", "post", "--data", "hi", "--count", "3", "--tag", "7",
        ],
        &dir,
    );
    assert_eq!(code(&out), 0);
    assert!(
        stdout(&out).contains("posted tag 9: sequence 3 (2 bytes)"),
        "{}",
        stdout(&out)
    );

    // The operation fails: exit code 1, the status named.
    let out = vmbsrvctl(&["--sim", "stats", "--channel", "0x55"], &dir);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("STATUS_NOT_FOUND (0xc0000225)"),
        "{}",
        stderr(&out)
    );
    let out = vmbsrvctl(&["--sim", "--json", "destroy", "--channel", "12"], &dir);
    assert_eq!(code(&out), 1);
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["detail"]["status"], "0xc0000225");
    assert_eq!(value["detail"]["failure"], "Operation");

    // A VMBus handle the simulated host cannot convert.
    let out = vmbsrvctl(&["--sim", "create", "--vmbus-handle", "0x10"], &dir);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("valid in the calling process"),
        "{}",
        stderr(&out)
    );

    // Usage errors.
    assert_eq!(code(&vmbsrvctl(&["--sim", "frobnicate"], &dir)), 2);
    assert_eq!(code(&vmbsrvctl(&["--sim", "guest-ack", "x"], &dir)), 2);
    assert_eq!(code(&vmbsrvctl(&["--help"], &dir)), 0);
}

#[cfg(not(windows))]
#[test]
fn without_sim_there_is_no_driver_off_windows() {
    let out = vmbsrvctl(&["info"], &package());
    assert_eq!(code(&out), 4);
    assert!(stderr(&out).contains("use --sim"), "{}", stderr(&out));
    let out = vmbsrvctl(&["demo"], &package());
    assert_eq!(code(&out), 4);
}

#[test]
fn help_says_who_can_have_a_vmbus_handle() {
    let out = vmbsrvctl(&["create", "--help"], &package());
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    assert!(text.contains("VM's worker process"), "{text}");
    assert!(text.contains("What vmbsrvctl does without one"), "{text}");
    let out = vmbsrvctl(&["--help"], &package());
    assert!(stdout(&out).contains("Exit codes:"));
}

#[test]
fn batch_saves_and_restores_over_one_handle() {
    let dir = scratch("batch");
    let script = format!(
        "\
create --max-in-flight 8
post --channel last --count 4 --data hello
guest-ack 1
fetch --channel last
save --channel last --to {dir}/b.vbss --then complete
fetch --channel last   # the three in flight are Migrated here
destroy --channel last
restore --from {dir}/b.vbss
guest-ack
fetch --channel last
stats --channel last
destroy --channel last
",
        dir = dir.display()
    );
    std::fs::write(dir.join("script.txt"), script).unwrap();
    let out = vmbsrvctl(&["--sim", "batch", "@script.txt"], &dir);
    let text = stdout(&out);
    assert_eq!(code(&out), 0, "{text}{}", stderr(&out));
    assert!(
        text.contains("sequence 2 tag 1: Migrated, attempts 1"),
        "{text}"
    );
    assert!(
        text.contains("sequence 4 tag 3: Acked, attempts 2"),
        "{text}"
    );
    assert!(text.contains("restore_generation 1"), "{text}");
    assert!(text.contains("posted 4, acked 4"), "{text}");

    let out = vmbsrvctl(&["inspect", "@b.vbss"], &dir);
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&out).matches("  delivery @").count(), 3);

    // A failing line stops the batch with its exit code and line number.
    std::fs::write(dir.join("bad.txt"), "info\nstats --channel 99\ninfo\n").unwrap();
    let out = vmbsrvctl(&["--sim", "batch", "@bad.txt"], &dir);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("line 2:"), "{}", stderr(&out));
}

#[test]
fn a_failed_restore_destroys_the_channel_it_created() {
    let dir = scratch("failed-restore");
    let mut bytes = std::fs::read(package().join("tests/fixtures/demo.vbss")).unwrap();
    bytes[330] ^= 1;
    std::fs::write(dir.join("damaged.vbss"), &bytes).unwrap();
    let out = vmbsrvctl(&["--sim", "restore", "--from", "@damaged.vbss"], &dir);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("STATUS_DATA_ERROR"),
        "{}",
        stderr(&out)
    );

    // Over one handle: the channel the restore created is gone again.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut session = crate::Session::open(true, false, false, &mut out, &mut err)
        .unwrap_or_else(|_| panic!("simulated session"));
    let restore = crate::Command::Restore {
        from: dir.join("damaged.vbss"),
        channel: None,
        max_in_flight: 64,
        max_message_len: 4096,
    };
    assert!(session.run(restore).is_err());
    assert_eq!(session.client.info().unwrap().channels_in_use, 0);
    assert!(session.last.is_none());
}
