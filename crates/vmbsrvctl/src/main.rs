//! `vmbsrvctl`: the command line of vmbsrv's control interface. Everything is in the library
//! ([`vmbsrvctl::run`]); see `vmbsrvctl --help`.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let progress = std::io::stderr().is_terminal();
    let code = vmbsrvctl::run(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
        progress,
    );
    ExitCode::from(code)
}
