//! The `imshard` command: `serve` runs the server, `token` mints a token.
//!
//! Start-up errors are printed once, to stderr, as `imshard: <what is wrong>`; the
//! log (stdout) is coloured only when stdout is a terminal and `NO_COLOR` is unset.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use imshard::config::{Cli, Command, CommonConfig, Config, ServeArgs, TokenArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Token(args) => token(&args),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let cfg = match Config::from_serve_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imshard: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&cfg.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("imshard: bad log ({:?}): {e}", cfg.log);
            return ExitCode::from(2);
        }
    };
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(colour)
        .init();
    match imshard::server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imshard: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(args: &TokenArgs) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("imshard token: {e}");
        ExitCode::from(2)
    };
    if !imshard::ids::is_valid_id(&args.user) || !imshard::ids::is_valid_id(&args.device) {
        return fail(&"--user and --device must be 1-64 chars of [A-Za-z0-9_.@]");
    }
    if !imshard::auth::DEVICE_TYPES.contains(&args.device_type.as_str()) {
        return fail(&"--device-type must be one of mobile, desktop, web, pad");
    }
    let common = match CommonConfig::from_args(&args.common) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let secret = match imshard::auth::load_or_create_secret(
        common.jwt_secret.as_deref(),
        &common.data_dir,
        false,
    ) {
        Ok((s, _)) => s,
        Err(e) => return fail(&e),
    };
    match imshard::auth::mint(
        &secret,
        &args.user,
        &args.device,
        &args.device_type,
        args.admin,
        args.ttl.as_secs(),
    ) {
        Ok(t) => match &args.demo_url {
            None => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Some(base) => match args.demo_link(base, &t) {
                Ok(link) => {
                    println!("{link}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            },
        },
        Err(e) => {
            eprintln!("imshard token: {e}");
            ExitCode::FAILURE
        }
    }
}
