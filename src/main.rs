use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use x402_gateway::config::{Config, FacilitatorChoice};
use x402_gateway::logging::{self, LogFormat};
use x402_gateway::proxy::server::Server;
use x402_gateway::routing::RouteTable;
use x402_gateway::settlement::SettleMode;

#[derive(Parser)]
#[command(name = "x402-gateway", version, about = "Pay-per-call reverse proxy speaking x402")]
struct Cli {
    /// Log format of the access and event logs (on stderr).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Path of the configuration file.
    #[arg(long, short, env = "X402_GATEWAY_CONFIG", default_value = "gateway.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(ConfigArg),
    /// Validate the configuration and print the route table; exit code 1 if it is invalid.
    Check(ConfigArg),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(&args.config),
        Command::Run(args) => {
            logging::init(cli.log_format);
            run(&args.config)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            let upstreams = config.upstreams.len();
            let table = RouteTable::new(config.routes);
            println!("{}: OK ({} routes, {upstreams} upstreams)", path.display(), table.routes().len());
            println!("routes, in match order:");
            println!("  {:<16} {:<32} {:<16} PRICE", "METHODS", "PATH", "UPSTREAM");
            for route in table.routes() {
                let methods = match &route.methods {
                    None => "*".to_string(),
                    Some(methods) => methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","),
                };
                let price = match &route.payment {
                    None => "free".to_string(),
                    Some(paid) => {
                        let settle = match paid.settle {
                            SettleMode::After => "after",
                            SettleMode::Before => "before",
                        };
                        let facilitator = match &paid.facilitator {
                            FacilitatorChoice::Local => "local",
                            FacilitatorChoice::Remote(remote) => remote.url.as_str(),
                        };
                        format!("paid (settle {settle}, facilitator {facilitator})")
                    }
                };
                println!("  {methods:<16} {:<32} {:<16} {price}", route.pattern_text, route.upstream.name);
                for offer in route.payment.iter().flat_map(|p| &p.offers) {
                    println!(
                        "      {} atomic units of {} ({}, {} decimals) on {} to {}, maxTimeoutSeconds {}",
                        offer.amount,
                        offer.asset.symbol,
                        offer.asset.address,
                        offer.asset.decimals,
                        offer.network.caip2,
                        offer.pay_to,
                        offer.max_timeout_seconds
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = match shutdown_signal() {
            Ok(shutdown) => shutdown,
            Err(err) => {
                tracing::error!("cannot install signal handlers: {err}");
                return ExitCode::FAILURE;
            }
        };
        let config = match Config::load(path) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!("{err}");
                return ExitCode::FAILURE;
            }
        };
        match Server::bind(config).await {
            Ok(server) => {
                server.run(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("{err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Registers SIGINT and SIGTERM handlers now (a signal that arrives before the server runs must not kill it),
/// and returns a future that resolves when either arrives.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
