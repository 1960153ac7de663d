//! The main job: a simulated live migration of a busy vmbsrv channel, with a readable report.
//!
//! ```sh
//! cargo run --release --example live_migration -- --help
//! ```
//!
//! A channel carries thousands of messages while the guest acknowledges out of order; the channel
//! is saved mid-flight in small chunks, torn down, restored into a new channel on a new simulator
//! instance, and delivery finishes there. By default the simulators run in deterministic mode
//! (docs/simulator.md): one seed gives one report, timings aside; `--threaded` lets the
//! simulator's worker threads race the driver instead. The last line is
//! `RESULT: delivered=<n> lost=<n> duplicated=<n> corrupted=<n>`; the exit status is non-zero if
//! anything was lost, duplicated or corrupted, or the simulator recorded a contract violation.

use std::io::Write;
use std::process::ExitCode;

use vmbsrv_testkit::{Cut, MigrationConfig, MigrationReport, run_live_migration};

const USAGE: &str = "\
usage: live_migration [options]
  --messages N     messages to post in total            (default 10000)
  --in-flight N    the channel's in-flight limit          (default 1024)
  --max-len N      largest message payload in bytes        (default 512)
  --chunk-size N   bytes per VmbChannelSaveContinue buffer (default 4096)
  --cut N          posts before the save cuts in           (default messages/2)
  --seed N         seed of every random choice             (default 1)
  --in-order       the guest acknowledges oldest first (default: random order)
  --threaded       simulator worker threads race the driver, as on Windows; figures vary
                   from run to run (default: deterministic, the seed decides the schedule
                   and a run replays exactly)
  --json           print the report as JSON
  --quiet          no progress indicator";

struct Options {
    config: MigrationConfig,
    json: bool,
    quiet: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut config = MigrationConfig::new(10_000, 1);
    config.max_in_flight = 1024;
    let mut cut = None;
    let mut json = false;
    let mut quiet = false;
    let mut threaded = false;
    let mut args = std::env::args().skip(1);
    let number = |name: &str, value: Option<String>| -> Result<u64, String> {
        value
            .ok_or_else(|| format!("{name} needs a value"))?
            .parse::<u64>()
            .map_err(|_| format!("{name} needs a non-negative integer"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--messages" => config.messages = number("--messages", args.next())?,
            "--in-flight" => {
                config.max_in_flight = u32::try_from(number("--in-flight", args.next())?)
                    .map_err(|_| "--in-flight is too large".to_string())?;
            }
            "--max-len" => {
                config.max_message_len = u32::try_from(number("--max-len", args.next())?)
                    .map_err(|_| "--max-len is too large".to_string())?;
            }
            "--chunk-size" => config.chunk_size = number("--chunk-size", args.next())? as usize,
            "--cut" => cut = Some(number("--cut", args.next())?),
            "--seed" => config.seed = number("--seed", args.next())?,
            "--in-order" => config.out_of_order = false,
            "--json" => json = true,
            "--quiet" => quiet = true,
            "--threaded" => threaded = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if config.max_in_flight == 0 || config.max_in_flight > 65_536 {
        return Err("--in-flight must be in 1..=65536".into());
    }
    if config.max_message_len == 0 || config.max_message_len > 65_536 {
        return Err("--max-len must be in 1..=65536".into());
    }
    config.cut = Cut::AfterPosts(cut.unwrap_or(config.messages / 2));
    config.sim = MigrationConfig::sim_for(config.max_in_flight);
    if !threaded {
        config = config.deterministic();
    }
    Ok(Options {
        config,
        json,
        quiet,
    })
}

fn progress(phase: &str, done: u64, total: u64) {
    eprint!("\r{phase}: {done}/{total} messages");
    let _ = std::io::stderr().flush();
}

fn print_text(config: &MigrationConfig, report: &MigrationReport) {
    let verdict = report.verdict;
    println!("vmbsrv simulated live migration");
    println!(
        "  seed {}, {} simulator, in-flight limit {}, payloads 1..={} bytes, guest acks {}",
        config.seed,
        if config.is_deterministic() {
            "deterministic"
        } else {
            "threaded"
        },
        config.max_in_flight,
        config.max_message_len,
        if config.out_of_order {
            "out of order"
        } else {
            "in order"
        }
    );
    // Which reading of each undocumented KMCL behaviour the simulator played (VMBSRV_SIM_READINGS).
    println!("  KMCL readings: {}", config.sim.readings());
    println!();
    println!("  messages posted            {:>12}", report.posted);
    println!(
        "  in flight at save          {:>12}   ({} read by the guest, the rest in ring/host queue)",
        report.in_flight_at_save, report.held_by_guest_at_save
    );
    println!(
        "  bytes saved                {:>12}   (save stream: channel record + KMCL chunks)",
        report.saved_bytes
    );
    println!(
        "  chunks                     {:>12}   of at most {} bytes",
        report.chunks, report.chunk_size
    );
    println!(
        "  save time                  {:>12.3} ms",
        report.save_time.as_secs_f64() * 1e3
    );
    println!(
        "  restore time               {:>12.3} ms",
        report.restore_time.as_secs_f64() * 1e3
    );
    println!(
        "  save cost per packet       {:>12.0} ns",
        report.save_ns_per_packet()
    );
    println!(
        "  restore cost per packet    {:>12.0} ns",
        report.restore_ns_per_packet()
    );
    println!("  handed over at migration   {:>12}", report.migrated);
    println!(
        "  KMCL contract violations   {:>12}",
        report.violations.len()
    );
    for violation in &report.violations {
        println!("    {violation}");
    }
    println!(
        "  total run time             {:>12.3} s",
        report.total_time.as_secs_f64()
    );
    println!();
    println!(
        "RESULT: delivered={} lost={} duplicated={} corrupted={}",
        verdict.delivered, verdict.lost, verdict.duplicated, verdict.corrupted
    );
}

fn print_json(config: &MigrationConfig, report: &MigrationReport) {
    let verdict = report.verdict;
    println!(
        "{{\"seed\":{},\"deterministic\":{},\"max_in_flight\":{},\"max_message_len\":{},\"out_of_order\":{},\
\"messages_posted\":{},\"in_flight_at_save\":{},\"held_by_guest_at_save\":{},\"bytes_saved\":{},\
\"chunks\":{},\"chunk_size\":{},\"save_time_ns\":{},\"restore_time_ns\":{},\
\"save_ns_per_packet\":{:.1},\"restore_ns_per_packet\":{:.1},\"migrated\":{},\"violations\":{},\
\"delivered\":{},\"lost\":{},\"duplicated\":{},\"corrupted\":{}}}",
        config.seed,
        config.is_deterministic(),
        config.max_in_flight,
        config.max_message_len,
        config.out_of_order,
        report.posted,
        report.in_flight_at_save,
        report.held_by_guest_at_save,
        report.saved_bytes,
        report.chunks,
        report.chunk_size,
        report.save_time.as_nanos(),
        report.restore_time.as_nanos(),
        report.save_ns_per_packet(),
        report.restore_ns_per_packet(),
        report.migrated,
        report.violations.len(),
        verdict.delivered,
        verdict.lost,
        verdict.duplicated,
        verdict.corrupted
    );
}

fn main() -> ExitCode {
    let mut options = match parse_args() {
        Ok(options) => options,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !options.quiet && !options.json {
        options.config.progress = Some(progress);
    }
    let report = match run_live_migration(&options.config) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("\nerror: {} failed with {}", error.step, error.status);
            return ExitCode::from(1);
        }
    };
    if options.config.progress.is_some() {
        eprintln!();
    }
    if options.json {
        print_json(&options.config, &report);
    } else {
        print_text(&options.config, &report);
    }
    if report.verdict.is_clean()
        && report.violations.is_empty()
        && report.verdict.delivered == report.posted
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
