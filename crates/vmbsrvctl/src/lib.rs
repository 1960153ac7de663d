//! `vmbsrvctl`: the command line of vmbsrv's control interface (docs/control.md).
//!
//! The whole command line is [`run`]; `src/main.rs` only hands it the process's arguments and
//! standard streams, so tests run exactly the binary's code in-process (the workspace's driver
//! crate is a path `cdylib`, whose hashless output would collide if the tests spawned a binary
//! built with the dev profile's `panic = "abort"` next to test code built with unwinding).
#![forbid(unsafe_code)]
// `Backend` has a single variant on builds other than Windows, so `if let Backend::Sim(..)` is
// irrefutable there and refutable on Windows.
#![allow(irrefutable_let_patterns)]

use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use vmbsrv_client::inspect::inspect;
use vmbsrv_client::{
    ChannelConfig, Client, CreateMode, Error, Failure, IoctlError, NtStatus, PostOptions, Progress,
    Transport, status_name,
};

/// Exit codes (also in `--help`).
mod exit {
    /// Success.
    pub(crate) const OK: u8 = 0;
    /// The driver ran the request and the operation failed (its status is printed).
    pub(crate) const OPERATION: u8 = 1;
    /// Usage error (bad arguments).
    pub(crate) const USAGE: u8 = 2;
    /// The IOCTL was refused (malformed, not allowed), or the driver's answer was unreadable.
    pub(crate) const IOCTL: u8 = 3;
    /// The driver could not be reached (no device, cannot open it, no `--sim` off Windows).
    pub(crate) const UNREACHABLE: u8 = 4;
    /// A local file could not be read or written.
    pub(crate) const IO: u8 = 5;
    /// `inspect` found defects, or `demo` did not deliver exactly once.
    pub(crate) const VERDICT: u8 = 6;
}

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  the driver ran the request and the operation failed (status printed)
  2  usage error
  3  the IOCTL was refused (malformed or not allowed: STATUS_ACCESS_DENIED, ...) or the answer was unreadable
  4  the driver could not be reached (no control device, CreateFile failed, or not Windows without --sim)
  5  a local file could not be read or written
  6  inspect found defects, or demo did not deliver exactly once

Handles and owners: every channel belongs to the control handle that created it, and closing the
handle destroys its channels (docs/control.md §7). One vmbsrvctl invocation is one handle, so a
channel created by `vmbsrvctl create` is gone when that command exits. Chain commands over one
handle with `vmbsrvctl batch` (one command per line; `last` names the channel created last).

--sim runs an in-process simulated vmbsrv (the driver's own dispatcher over the KMCL simulator,
with a simulated guest), on any platform. Each invocation is a fresh simulated host: a channel
command given no --channel first creates a running channel whose guest has negotiated.";

const CREATE_HELP: &str = "\
Create a channel (CreateChannel).

Who can have a VMBus handle: `--vmbus-handle` must be a VMBus handle valid in the calling process.
Per the KMCL header, the VMBus handle of a VM's partition is opened in that VM's worker process
(vmwp.exe, running as the VM's virtual account), and the driver converts it in the caller's
process context (docs/control.md §9-§10, docs/windows.md). Only the VM worker process (or a SYSTEM
host service acting for it) can therefore create a channel bound to a VM; an administrator may not
(STATUS_ACCESS_DENIED), and a handle value copied from another process names nothing here.

What vmbsrvctl does without one: it is not the VM worker and holds no VMBus handle, so by default
it creates a host-local channel (vmbus_handle = 0), which only SYSTEM and elevated administrators
may do: the test path of docs/windows.md §10 (experiment 2 settles whether such a channel is
offered anywhere). The channel lives as long as this invocation's handle: use `batch` to use it.";

#[derive(Debug, Parser)]
#[command(
    name = "vmbsrvctl",
    version,
    about = "Drive vmbsrv's control interface, save and restore channels, inspect save-stream files",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Use an in-process simulated vmbsrv instead of the control device (any platform).
    #[arg(long, global = true)]
    sim: bool,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// (--sim) Create a channel, post a burst, save it to a file, restore the file into a new
    /// simulated host, and report whether every message was delivered exactly once.
    Demo {
        /// Messages posted before the save.
        #[arg(long, default_value_t = 16)]
        burst: u64,
        /// How many of them the guest acknowledges before the save (the rest travel in the file).
        #[arg(long, default_value_t = 6)]
        ack: u64,
        /// The save-stream file to write.
        #[arg(long, default_value = "vmbsrv-demo.vbss")]
        to: PathBuf,
    },
    /// Decode a save-stream file: channel record, frames, every delivery record; explain defects.
    /// Needs no driver.
    Inspect {
        /// The save-stream file.
        file: PathBuf,
    },
    /// Show the driver's limits (QueryInfo).
    Info,
    /// List the vmbsrv control devices present.
    List,
    #[command(long_about = CREATE_HELP)]
    /// Create a channel (see `create --help` for who can pass a VMBus handle).
    Create {
        /// A VMBus handle valid in this process (0: none, a host-local channel).
        #[arg(long, default_value = "0", value_parser = parse_u64)]
        vmbus_handle: u64,
        /// Outstanding deliveries + unfetched outcomes allowed.
        #[arg(long, default_value_t = 64)]
        max_in_flight: u32,
        /// Largest message.
        #[arg(long, default_value_t = 4096)]
        max_message_len: u32,
        /// Create for a restore (configure only, no offer).
        #[arg(long)]
        for_restore: bool,
    },
    /// Channel statistics (QueryStatistics).
    Stats(ChannelArg),
    /// Post a message (PostMessage).
    Post {
        #[command(flatten)]
        channel: ChannelArg,
        /// Client tag returned with the outcome.
        #[arg(long, default_value = "0", value_parser = parse_u64)]
        tag: u64,
        /// Trace id: 32 hex digits.
        #[arg(long, value_parser = parse_trace_id)]
        trace_id: Option<[u8; 16]>,
        /// The payload, as text.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        /// The payload, from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// How many times to post it (tags tag, tag+1, ...).
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Fetch outcomes (FetchOutcomes).
    Fetch {
        #[command(flatten)]
        channel: ChannelArg,
        /// At most this many (1..=65536).
        #[arg(long, default_value_t = 4096)]
        max: u32,
    },
    /// Save a channel into a save-stream file (SaveBegin, SaveContinue..., SaveEnd).
    Save {
        #[command(flatten)]
        channel: ChannelArg,
        /// The file to write (written to FILE.partial, then renamed).
        #[arg(long)]
        to: PathBuf,
        /// After the save: `resume` the channel (default), `complete` the migration (its
        /// in-flight deliveries become Migrated), or `keep` it in phase Saved.
        #[arg(long, default_value = "resume", value_parser = ["resume", "complete", "keep"])]
        then: String,
    },
    /// Restore a save-stream file into a new channel created for restore, and start it.
    Restore {
        /// The save-stream file.
        #[arg(long)]
        from: PathBuf,
        /// Restore into this channel (created ForRestore) instead of a new one.
        #[arg(long, value_parser = parse_channel)]
        channel: Option<ChannelRef>,
        /// `max_in_flight` of the new channel.
        #[arg(long, default_value_t = 65536)]
        max_in_flight: u32,
        /// `max_message_len` of the new channel.
        #[arg(long, default_value_t = 65536)]
        max_message_len: u32,
    },
    /// Disable a channel (revoke the offer; outstanding deliveries come back Cancelled).
    Disable(ChannelArg),
    /// Destroy a channel.
    Destroy(ChannelArg),
    /// (--sim) The simulated guest reads its ring and acknowledges up to COUNT messages.
    GuestAck {
        /// How many.
        #[arg(default_value_t = usize::MAX)]
        count: usize,
    },
    /// Run commands over one control handle: one vmbsrvctl command per line (without the program
    /// name and global options), from FILE or stdin; `#` starts a comment; `last` names the
    /// channel created last. Stops at the first failure.
    Batch {
        /// The command file (default: stdin).
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct ChannelArg {
    /// The channel id (decimal or 0x hex), or `last`.
    #[arg(long, value_parser = parse_channel)]
    channel: Option<ChannelRef>,
}

#[derive(Debug, Clone, Copy)]
enum ChannelRef {
    Id(u64),
    Last,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("`{s}`: {e}"))
}

fn parse_channel(s: &str) -> Result<ChannelRef, String> {
    if s == "last" {
        Ok(ChannelRef::Last)
    } else {
        parse_u64(s).map(ChannelRef::Id)
    }
}

fn parse_trace_id(s: &str) -> Result<[u8; 16], String> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a trace id is 32 hex digits".into());
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(id)
}

/// Either transport.
enum Backend {
    #[cfg(feature = "sim")]
    Sim(vmbsrv_client::sim::SimHost),
    #[cfg(windows)]
    Device(vmbsrv_client::windows::DeviceTransport),
}

impl Transport for Backend {
    fn ioctl(&mut self, code: u32, input: &[u8], output: &mut [u8]) -> Result<usize, IoctlError> {
        match self {
            #[cfg(feature = "sim")]
            Self::Sim(host) => host.ioctl(code, input, output),
            #[cfg(windows)]
            Self::Device(device) => device.ioctl(code, input, output),
        }
    }
}

/// A failure of a command: an exit code and what to print.
struct Failed {
    code: u8,
    error: Option<Error>,
    message: String,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        let code = match error.failure {
            Failure::Operation => exit::OPERATION,
            Failure::Ioctl | Failure::Protocol => exit::IOCTL,
            Failure::Transport => exit::UNREACHABLE,
            Failure::Io => exit::IO,
        };
        Self {
            code,
            message: error.to_string(),
            error: Some(error),
        }
    }
}

fn failed(code: u8, message: impl Into<String>) -> Failed {
    Failed {
        code,
        error: None,
        message: message.into(),
    }
}

/// One control handle and what this invocation knows about it.
struct Session<'o> {
    client: Client<Backend>,
    out: &'o mut dyn Write,
    err: &'o mut dyn Write,
    progress: bool,
    json: bool,
    last: Option<u64>,
    /// --sim: whether the simulated guest is plugged in (the VM runs on this host).
    guest_attached: bool,
    #[cfg(feature = "sim")]
    guest: Option<vmbsrv_client::sim::SimGuest>,
}

type Outcome = Result<(), Failed>;

impl<'o> Session<'o> {
    fn open(
        sim: bool,
        json: bool,
        progress: bool,
        out: &'o mut dyn Write,
        err: &'o mut dyn Write,
    ) -> Result<Self, Failed> {
        if sim {
            #[cfg(feature = "sim")]
            {
                let host = vmbsrv_client::sim::SimHost::new()?;
                let guest = vmbsrv_client::sim::SimGuest::new();
                guest.attach(&host)?;
                return Ok(Self {
                    client: Client::new(Backend::Sim(host)),
                    out,
                    err,
                    progress,
                    json,
                    last: None,
                    guest_attached: true,
                    guest: Some(guest),
                });
            }
            #[cfg(not(feature = "sim"))]
            return Err(failed(
                exit::UNREACHABLE,
                "this vmbsrvctl was built without the `sim` feature",
            ));
        }
        #[cfg(windows)]
        {
            let device = vmbsrv_client::windows::DeviceTransport::open()?;
            Ok(Self {
                client: Client::new(Backend::Device(device)),
                out,
                err,
                progress,
                json,
                last: None,
                guest_attached: false,
                #[cfg(feature = "sim")]
                guest: None,
            })
        }
        #[cfg(not(windows))]
        {
            let _ = (json, progress, out, err);
            Err(failed(
                exit::UNREACHABLE,
                "the vmbsrv control device exists only on Windows: use --sim for the in-process \
                 simulated driver",
            ))
        }
    }

    fn is_sim(&self) -> bool {
        #[cfg(feature = "sim")]
        return self.guest.is_some();
        #[cfg(not(feature = "sim"))]
        false
    }

    fn print(&mut self, text: &str, value: serde_json::Value) {
        let _ = if self.json {
            writeln!(self.out, "{value}")
        } else {
            writeln!(self.out, "{text}")
        };
    }

    /// The channel a command names; with `--sim` and none named, a fresh running channel.
    fn channel(&mut self, arg: Option<ChannelRef>) -> Result<u64, Failed> {
        match arg {
            Some(ChannelRef::Id(id)) => Ok(id),
            Some(ChannelRef::Last) => self.last.ok_or_else(|| {
                failed(
                    exit::USAGE,
                    "`last`: no channel was created in this session",
                )
            }),
            None if self.is_sim() => match self.last {
                Some(id) => Ok(id),
                None => {
                    self.create(0, 64, 4096, false, true)?;
                    self.last
                        .ok_or_else(|| failed(exit::OPERATION, "no channel"))
                }
            },
            None => Err(failed(exit::USAGE, "--channel is required")),
        }
    }

    fn create(
        &mut self,
        vmbus_handle: u64,
        max_in_flight: u32,
        max_message_len: u32,
        for_restore: bool,
        quiet: bool,
    ) -> Outcome {
        let config = ChannelConfig {
            vmbus_handle,
            interface_type: SIM_OR_TEST_INTERFACE,
            instance: SIM_OR_TEST_INSTANCE,
            max_in_flight,
            max_message_len,
            server_flags: 0,
            mode: if for_restore {
                CreateMode::ForRestore
            } else {
                CreateMode::Start
            },
        };
        let id = self.client.create(&config)?;
        self.last = Some(id);
        let mut negotiated = false;
        #[cfg(feature = "sim")]
        if let (Some(guest), Backend::Sim(host), false) =
            (&self.guest, self.client.transport(), for_restore)
        {
            guest.open(host)?;
            negotiated = true;
        }
        if quiet {
            if !self.json {
                let _ = writeln!(
                    self.err,
                    "(--sim: created channel {id:#x}{} for this invocation)",
                    if negotiated { ", guest negotiated" } else { "" }
                );
            }
            return Ok(());
        }
        self.print(
            &format!(
                "channel {id:#x} created ({}){}",
                if for_restore { "ForRestore" } else { "Start" },
                if negotiated { ", guest negotiated" } else { "" }
            ),
            json!({"channel": id, "mode": if for_restore { "ForRestore" } else { "Start" }, "guest_negotiated": negotiated}),
        );
        Ok(())
    }

    fn run(&mut self, command: Command) -> Outcome {
        match command {
            Command::Demo { burst, ack, to } => self.demo(burst, ack, &to),
            Command::Inspect { file } => inspect_file(&file, self.json, self.out),
            Command::Info => {
                let info = self.client.info()?;
                self.print(
                    &format!(
                        "control version {}\nguest protocol version {:#010x}\nchannels {} of {}\nmax_in_flight {}\nmax_message_len {}\nmax_record_len {}\nmax_chunk_len {}",
                        info.control_version,
                        info.guest_protocol_version,
                        info.channels_in_use,
                        info.max_channels,
                        info.max_in_flight,
                        info.max_message_len,
                        info.max_record_len,
                        info.max_chunk_len
                    ),
                    to_json(&info),
                );
                Ok(())
            }
            Command::List => self.list(),
            Command::Create {
                vmbus_handle,
                max_in_flight,
                max_message_len,
                for_restore,
            } => self.create(
                vmbus_handle,
                max_in_flight,
                max_message_len,
                for_restore,
                false,
            ),
            Command::Stats(arg) => {
                let id = self.channel(arg.channel)?;
                let s = self.client.statistics(id)?;
                self.print(
                    &format!(
                        "channel {id:#x}: phase {:?}, protocol {:#010x}, in_flight {}, pending_outcomes {}, max_in_flight {}, max_message_len {}, restore_generation {}\n  next_sequence {}, posted {}, acked {}, nacked {}, cancelled {}, corrupted {}, bad_acks {}\n  guest_requests {}, guest_bad_requests {}, guest_garbled {}",
                        s.phase,
                        s.protocol_version,
                        s.in_flight,
                        s.pending_outcomes,
                        s.max_in_flight,
                        s.max_message_len,
                        s.restore_generation,
                        s.next_sequence,
                        s.posted,
                        s.acked,
                        s.nacked,
                        s.cancelled,
                        s.corrupted,
                        s.bad_acks,
                        s.guest_requests,
                        s.guest_bad_requests,
                        s.guest_garbled
                    ),
                    json!({"channel": id, "statistics": to_json(&s)}),
                );
                Ok(())
            }
            Command::Post {
                channel,
                tag,
                trace_id,
                data,
                file,
                count,
            } => {
                let payload = match (data, file) {
                    (Some(text), _) => text.into_bytes(),
                    (None, Some(path)) => fs::read(&path)
                        .map_err(|e| failed(exit::IO, format!("{}: {e}", path.display())))?,
                    (None, None) => b"vmbsrvctl".to_vec(),
                };
                let id = self.channel(channel.channel)?;
                let mut sequences = Vec::new();
                for i in 0..count.max(1) {
                    let tag = tag.wrapping_add(i);
                    let sequence = self
                        .client
                        .post(id, &payload, PostOptions { tag, trace_id })?;
                    sequences.push((tag, sequence));
                }
                let text = sequences
                    .iter()
                    .map(|(tag, sequence)| {
                        format!(
                            "posted tag {tag}: sequence {sequence} ({} bytes)",
                            payload.len()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                self.print(
                    &text,
                    json!({"channel": id, "posted": sequences.iter().map(|(t, s)| json!({"tag": t, "sequence": s})).collect::<Vec<_>>()}),
                );
                Ok(())
            }
            Command::Fetch { channel, max } => {
                let id = self.channel(channel.channel)?;
                let batch = self.client.fetch(id, max)?;
                let mut text = batch
                    .outcomes
                    .iter()
                    .map(|o| {
                        format!(
                            "sequence {} tag {}: {:?}, attempts {}, guest_status {:#x}",
                            o.sequence, o.tag, o.kind, o.attempts, o.guest_status
                        )
                    })
                    .collect::<Vec<_>>();
                text.push(format!(
                    "{} outcomes, {} remaining",
                    batch.outcomes.len(),
                    batch.remaining
                ));
                self.print(
                    &text.join("\n"),
                    json!({"channel": id, "fetch": to_json(&batch)}),
                );
                Ok(())
            }
            Command::Save { channel, to, then } => {
                let id = self.channel(channel.channel)?;
                self.save(id, &to, &then)
            }
            Command::Restore {
                from,
                channel,
                max_in_flight,
                max_message_len,
            } => self.restore(&from, channel, max_in_flight, max_message_len),
            Command::Disable(arg) => {
                let id = self.channel(arg.channel)?;
                self.client.disable(id)?;
                self.print(
                    &format!("channel {id:#x} disabled"),
                    json!({"channel": id, "disabled": true}),
                );
                Ok(())
            }
            Command::Destroy(arg) => {
                let id = self.channel(arg.channel)?;
                let report = self.client.destroy(id)?;
                self.print(
                    &format!(
                        "channel {id:#x} destroyed: {} outcomes never fetched, {} deliveries outstanding",
                        report.unfetched_outcomes, report.in_flight
                    ),
                    json!({"channel": id, "destroyed": to_json(&report)}),
                );
                Ok(())
            }
            Command::GuestAck { count } => self.guest_ack(count),
            Command::Batch { file } => self.batch(file.as_deref()),
        }
    }

    fn list(&mut self) -> Outcome {
        #[cfg(feature = "sim")]
        if self.is_sim() {
            self.print(
                "sim: in-process simulated vmbsrv (the driver's dispatcher over kmcl-sim)",
                json!({"devices": ["sim"]}),
            );
            return Ok(());
        }
        #[cfg(windows)]
        {
            let paths = vmbsrv_client::windows::device_paths()?;
            let names: Vec<String> = paths
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let text = if names.is_empty() {
                "no vmbsrv control device present".to_string()
            } else {
                names.join("\n")
            };
            self.print(&text, json!({"devices": names}));
            return Ok(());
        }
        #[allow(unreachable_code)]
        Err(failed(exit::UNREACHABLE, "no transport"))
    }

    /// --sim: plugs the simulated guest in (`true`: the VM runs here) or out (the VM is paused).
    /// Nothing without --sim.
    fn sim_guest(&mut self, attached: bool) -> Outcome {
        #[cfg(feature = "sim")]
        if let (Some(guest), Backend::Sim(host)) = (&self.guest, self.client.transport()) {
            if attached == self.guest_attached {
                return Ok(());
            }
            if attached {
                guest.attach(host)?;
                host.wait_idle();
            } else {
                guest.detach();
            }
            self.guest_attached = attached;
        }
        let _ = attached;
        Ok(())
    }

    fn guest_ack(&mut self, count: usize) -> Outcome {
        #[cfg(feature = "sim")]
        if let (Some(guest), Backend::Sim(host)) = (&mut self.guest, self.client.transport()) {
            let acked = guest.acknowledge(host, count);
            self.print(
                &format!("guest acknowledged {acked}"),
                json!({"acknowledged": acked}),
            );
            return Ok(());
        }
        let _ = count;
        Err(failed(
            exit::USAGE,
            "guest-ack needs --sim (a real guest acknowledges by itself)",
        ))
    }

    fn save(&mut self, id: u64, to: &Path, then: &str) -> Outcome {
        // --sim: the VM is paused for the save, as Hyper-V pauses a partition before it saves
        // device state (docs/control.md §6, "Before the final save, stop the VM").
        self.sim_guest(false)?;
        let mut bar = ProgressBar::new(self.progress && !self.json, "saving");
        let saved = self.client.save_stream(id, &mut |p| bar.update(p));
        bar.finish();
        let (stream, report) = match saved {
            Ok(saved) => saved,
            Err(e) => {
                self.sim_guest(true)?;
                return Err(e.into());
            }
        };
        if let Err(e) = write_durably(to, &stream) {
            let _ = self.client.resume(id);
            return Err(failed(
                exit::IO,
                format!("{}: {e} (the channel was resumed)", to.display()),
            ));
        }
        let after = match then {
            "complete" => {
                self.client.complete_migration(id)?;
                "migration completed: in-flight deliveries are Migrated here"
            }
            "keep" => "the channel stays Saved",
            _ => {
                self.client.resume(id)?;
                self.sim_guest(true)?;
                "the channel was resumed"
            }
        };
        self.print(
            &format!(
                "saved channel {id:#x} to {}: record {} bytes, {} chunk(s) ({} bytes), stream {} bytes; {after}",
                to.display(),
                report.record_len,
                report.chunks.len(),
                report.chunks.iter().sum::<usize>(),
                report.stream_len
            ),
            json!({"channel": id, "file": to.display().to_string(), "save": to_json(&report), "then": then}),
        );
        Ok(())
    }

    fn restore(
        &mut self,
        from: &Path,
        channel: Option<ChannelRef>,
        max_in_flight: u32,
        max_message_len: u32,
    ) -> Outcome {
        let stream =
            fs::read(from).map_err(|e| failed(exit::IO, format!("{}: {e}", from.display())))?;
        let (id, created) = match channel {
            Some(c) => (self.channel(Some(c))?, false),
            None => {
                self.create(0, max_in_flight, max_message_len, true, true)?;
                (self.channel(Some(ChannelRef::Last))?, true)
            }
        };
        let mut bar = ProgressBar::new(self.progress && !self.json, "restoring");
        let restored = self
            .client
            .restore_stream(id, &stream, &mut |p| bar.update(p));
        bar.finish();
        let report = match restored {
            Ok(report) => report,
            Err(e) => {
                // docs/control.md §6: on any failure, destroy the channel (rebuilt deliveries come
                // back Migrated; the file is not consumed and can be replayed).
                if created {
                    let _ = self.client.destroy(id);
                    self.last = None;
                }
                return Err(e.into());
            }
        };
        // --sim: the VM resumes on this host.
        self.sim_guest(true)?;
        self.print(
            &format!(
                "restored {} into channel {id:#x}: {} chunk(s), {} bytes; the channel runs",
                from.display(),
                report.chunks,
                report.stream_len
            ),
            json!({"channel": id, "file": from.display().to_string(), "restore": to_json(&report)}),
        );
        Ok(())
    }

    fn demo(&mut self, burst: u64, ack: u64, to: &Path) -> Outcome {
        if !self.is_sim() {
            return Err(failed(exit::USAGE, "demo needs --sim"));
        }
        #[cfg(feature = "sim")]
        {
            let mut bar = ProgressBar::new(self.progress && !self.json, "demo");
            let mut store = |stream: &[u8]| -> Result<Vec<u8>, Error> {
                write_durably(to, stream)
                    .and_then(|()| fs::read(to))
                    .map_err(|e| {
                        Error::new(
                            None,
                            Failure::Io,
                            NtStatus::UNSUCCESSFUL,
                            format!("{}: {e}", to.display()),
                        )
                    })
            };
            let (_, r) =
                vmbsrv_client::sim::run_demo(burst, ack, &mut store, &mut |p| bar.update(p))?;
            bar.finish();
            let text = format!(
                "host A: channel {:#x} created, guest negotiated\n\
                 host A: posted {} messages; the guest acknowledged {} before the save\n\
                 host A: saved {} bytes ({} KMCL chunk(s)) to {}\n\
                 host A: migration completed: {} in-flight deliveries handed over (Migrated)\n\
                 host B: channel {:#x} restored from {}; {} restored deliveries completed with attempts 2\n\
                 host B: posted {} more; the guest acknowledged everything\n\
                 ledger: {} posted, {} delivered, {} lost, {} duplicated, {} corrupted\n\
                 verdict: {}",
                r.source_channel,
                r.posted_on_source,
                r.acked_on_source,
                r.stream_len,
                r.chunks,
                to.display(),
                r.migrated,
                r.destination_channel,
                to.display(),
                r.restored_deliveries,
                r.posted_on_destination,
                r.posted_on_source + r.posted_on_destination,
                r.delivered,
                r.lost,
                r.duplicates,
                r.corrupted,
                if r.exactly_once {
                    "exactly once"
                } else {
                    "NOT exactly once"
                }
            );
            self.print(
                &text,
                json!({"file": to.display().to_string(), "demo": to_json(&r)}),
            );
            if !r.exactly_once {
                return Err(failed(
                    exit::VERDICT,
                    "the demo did not deliver exactly once",
                ));
            }
        }
        Ok(())
    }

    fn batch(&mut self, file: Option<&Path>) -> Outcome {
        let text = match file {
            Some(path) => fs::read_to_string(path)
                .map_err(|e| failed(exit::IO, format!("{}: {e}", path.display())))?,
            None => {
                let mut text = String::new();
                for line in io::stdin().lock().lines() {
                    let line = line.map_err(|e| failed(exit::IO, format!("stdin: {e}")))?;
                    text.push_str(&line);
                    text.push('\n');
                }
                text
            }
        };
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words = std::iter::once("vmbsrvctl").chain(line.split_whitespace());
            let parsed = Cli::try_parse_from(words)
                .map_err(|e| failed(exit::USAGE, format!("line {}: {}", number + 1, e.render())))?;
            if matches!(parsed.command, Command::Batch { .. }) {
                return Err(failed(
                    exit::USAGE,
                    format!("line {}: batch cannot nest", number + 1),
                ));
            }
            if !self.json {
                let _ = writeln!(self.out, "> {line}");
            }
            self.run(parsed.command).map_err(|mut f| {
                f.message = format!("line {}: {}", number + 1, f.message);
                f
            })?;
        }
        Ok(())
    }
}

/// The channel GUIDs vmbsrvctl offers: the simulator scenario's, which the simulated guest binds
/// to (test values, not a product interface).
const SIM_OR_TEST_INTERFACE: vmbsrv_client::Guid = vmbsrv_client::TEST_INTERFACE_TYPE;
const SIM_OR_TEST_INSTANCE: vmbsrv_client::Guid = vmbsrv_client::TEST_INSTANCE;

fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// Writes `bytes` to `path` through a temporary name, flushed, then renamed.
fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = fs::File::create(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&partial, path)
}

fn inspect_file(path: &Path, json: bool, out: &mut dyn Write) -> Outcome {
    let bytes = fs::read(path).map_err(|e| failed(exit::IO, format!("{}: {e}", path.display())))?;
    let inspection = inspect(&bytes);
    let _ = if json {
        writeln!(out, "{}", to_json(&inspection))
    } else {
        writeln!(out, "{}: {inspection}", path.display())
    };
    if inspection.is_clean() {
        Ok(())
    } else {
        Err(Failed {
            code: exit::VERDICT,
            error: None,
            message: format!(
                "{}: {} defect(s); not a complete save stream",
                path.display(),
                inspection.defects.len()
            ),
        })
    }
}

/// A progress bar on stderr, drawn only when stderr is a terminal and the output is text.
struct ProgressBar {
    enabled: bool,
    label: &'static str,
    drawn: bool,
}

impl ProgressBar {
    fn new(enabled: bool, label: &'static str) -> Self {
        Self {
            enabled,
            label,
            drawn: false,
        }
    }

    fn update(&mut self, progress: Progress) {
        if !self.enabled {
            return;
        }
        let line = match progress {
            Progress::Saved { chunk, total, .. } => {
                format!("{}: {} chunk(s), {total} bytes", self.label, chunk + 1)
            }
            Progress::Restored { done, of } => {
                let width = 30u64;
                let filled = (done.min(of) * width).checked_div(of).unwrap_or(width);
                format!(
                    "{}: [{}{}] {done}/{of} bytes",
                    self.label,
                    "#".repeat(filled as usize),
                    " ".repeat((width - filled) as usize)
                )
            }
        };
        eprint!("\r{line}");
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// Runs the command line: `args` as the process received them (program name first), output on
/// `out` and `err`; `progress` draws a progress bar on standard error (the binary passes whether
/// it is a terminal). Returns the exit code (see `--help`).
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write, progress: bool) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let text = e.render().to_string();
            if e.use_stderr() {
                let _ = write!(err, "{text}");
                return exit::USAGE;
            }
            let _ = write!(out, "{text}");
            return exit::OK;
        }
    };
    let json = cli.json;
    let result = match &cli.command {
        // No driver needed.
        Command::Inspect { file } => inspect_file(file, json, out),
        command => match Session::open(cli.sim, json, progress, &mut *out, &mut *err) {
            Ok(mut session) => session.run(command.clone()),
            Err(f) => Err(f),
        },
    };
    match result {
        Ok(()) => exit::OK,
        Err(f) => {
            // A verdict (inspect's defects, the demo's ledger) is in the JSON already printed.
            if json && f.code != exit::VERDICT {
                let error = f.error.as_ref().map(|e| {
                    json!({
                        "op": e.op.map(|op| format!("{op:?}")),
                        "failure": format!("{:?}", e.failure),
                        "status": format!("{:#010x}", e.status.as_u32()),
                        "status_name": status_name(e.status),
                        "message": e.message,
                    })
                });
                let _ = writeln!(
                    out,
                    "{}",
                    json!({"error": f.message, "exit_code": f.code, "detail": error})
                );
            }
            let _ = writeln!(err, "vmbsrvctl: {}", f.message);
            f.code
        }
    }
}

#[cfg(test)]
mod tests;
