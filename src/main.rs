use std::process::ExitCode;

use clap::Parser;
use imshard::config::{Cli, Command, Config};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = match Config::from_serve_args(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("imshard: {e}");
                    return ExitCode::from(2);
                }
            };
            let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .init();
            match imshard::server::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("imshard: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token(args) => {
            let secret = Config::secret_settings(&args.common).and_then(|(dir, configured)| {
                imshard::auth::load_or_create_secret(configured.as_deref(), &dir, false)
                    .map(|(s, _)| s)
                    .map_err(|e| imshard::config::ConfigError::Invalid(e.to_string()))
            });
            let secret = match secret {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("imshard token: {e}");
                    return ExitCode::from(2);
                }
            };
            if !imshard::ids::is_valid_id(&args.user) || !imshard::ids::is_valid_id(&args.device) {
                eprintln!(
                    "imshard token: --user and --device must be 1-64 chars of [A-Za-z0-9_.@]"
                );
                return ExitCode::from(2);
            }
            if !imshard::auth::DEVICE_TYPES.contains(&args.device_type.as_str()) {
                eprintln!("imshard token: --device-type must be one of mobile, desktop, web, pad");
                return ExitCode::from(2);
            }
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
                    Some(base) => match Config::demo_url(&args.common, base, &t) {
                        Ok(url) => {
                            println!("{url}");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("imshard token: {e}");
                            ExitCode::from(2)
                        }
                    },
                },
                Err(e) => {
                    eprintln!("imshard token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
