use alloy::signers::local::PrivateKeySigner;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use x402_gateway::buyer;
use x402_gateway::config::{Config, FacilitatorChoice};
use x402_gateway::ledger;
use x402_gateway::logging::{self, LogFormat};
use x402_gateway::options::PaymentMode;
use x402_gateway::pipeline::Gateway;
use x402_gateway::pricing::Pricing;
use x402_gateway::routing::RouteTable;
use x402_gateway::settlement::SettleMode;
use x402_gateway::text::redacted_url;

#[derive(Parser)]
#[command(name = "x402-gateway", version, about = "Pay-per-call reverse proxy speaking x402")]
struct Cli {
    /// Path of the configuration file.
    #[arg(long, short, env = "X402_GATEWAY_CONFIG", default_value = "gateway.toml", global = true)]
    config: PathBuf,
    /// Log format of the access and event logs (on stderr).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run,
    /// Validate the configuration and print the route table; exit code 1 if it is invalid.
    Check,
    /// Pay for one call to an x402 resource and print the status, what was paid, the settlement and the body
    /// (to test a deployment). Exit code 0 for a 2xx answer.
    Pay(PayArgs),
    /// Read and reconcile the payment ledger (`[ledger] path` of the configuration).
    Ledger {
        #[command(subcommand)]
        action: LedgerAction,
    },
}

#[derive(Subcommand)]
enum LedgerAction {
    /// Payments, newest first.
    List {
        /// verified, settling, settled, failed, refund_needed or released.
        #[arg(long)]
        state: Option<String>,
        /// A route's path pattern, as in the configuration.
        #[arg(long)]
        route: Option<String>,
        /// The payer's 0x address.
        #[arg(long)]
        payer: Option<String>,
        /// The most rows to print.
        #[arg(long, default_value = "100")]
        limit: u32,
    },
    /// One payment, in full (JSON).
    Show {
        /// The payment's ID, as `ledger list` prints it.
        id: i64,
    },
    /// Resolve rows left open (crashes, settlement timeouts) against the chain, and report.
    Reconcile {
        /// Also rows touched in the last 5 minutes: only when no gateway is running on this ledger.
        #[arg(long)]
        all: bool,
    },
    /// Settled revenue by route, day (UTC), network and asset, in atomic units.
    Revenue,
}

#[derive(clap::Args)]
struct PayArgs {
    /// The resource to call.
    url: String,
    /// Environment variable that holds the buyer's private key (0x hex).
    #[arg(long, default_value = "X402_BUYER_KEY")]
    key_env: String,
    /// Pay with x402 v1 (`X-PAYMENT`) instead of v2 (`PAYMENT-SIGNATURE`).
    #[arg(long)]
    v1: bool,
    /// The scheme to pay: `exact`, or `upto` (a Permit2 ceiling, charged by usage; v2 only). By default `exact`
    /// when offered, else `upto`.
    #[arg(long, value_enum)]
    scheme: Option<SchemeArg>,
    /// The most to pay (for `upto`, to authorize) for this call, in the asset's atomic units (100000 is $0.10 of
    /// USDC).
    #[arg(long, default_value = "100000")]
    max_amount: String,
    /// The request's method.
    #[arg(long, short = 'X', default_value = "GET")]
    method: String,
    /// A request header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// A request body.
    #[arg(long, short = 'd')]
    data: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SchemeArg {
    Exact,
    Upto,
}

/// The global flags' argument ids, as the derive names them.
const CONFIG: &str = "config";
const LOG_FORMAT: &str = "log_format";

/// The command line. `--config` and `--log-format` are global, so they may come before or after a subcommand;
/// where one does not apply it is shadowed by a hidden copy of itself (clap propagates a global flag only to
/// subcommands without an argument of the same id), so that help shows each flag only where it means something.
fn command() -> clap::Command {
    let cli = Cli::command();
    let hidden = |id: &str| -> Vec<clap::Arg> {
        let found = cli.get_arguments().filter(|arg| arg.get_id() == id);
        found.map(|arg| arg.clone().global(false).hide(true)).collect()
    };
    let (config, log_format) = (hidden(CONFIG), hidden(LOG_FORMAT));
    let both: Vec<clap::Arg> = config.into_iter().chain(log_format.iter().cloned()).collect();
    // `run` and `ledger reconcile` log; `pay` reads no configuration.
    cli.mut_subcommand("check", |check| check.args(log_format.clone()))
        .mut_subcommand("pay", |pay| pay.args(both))
        .mut_subcommand("ledger", |ledger| {
            ["list", "show", "revenue"]
                .into_iter()
                .fold(ledger, |ledger, read| ledger.mut_subcommand(read, |sub| sub.args(log_format.clone())))
        })
}

/// The tokio runtime a command runs on; `None` (reported) if the system refuses one.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder.enable_all().build().map_err(|err| eprintln!("error: cannot start the runtime: {err}")).ok()
}

/// Appends a formatted line to a `String` (formatting into a `String` cannot fail).
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// `1 route`, `2 routes`.
fn counted(count: usize, thing: &str) -> String {
    match count {
        1 => format!("1 {thing}"),
        _ => format!("{count} {thing}s"),
    }
}

/// Writes a command's output; a closed pipe (`| head`) is not an error worth a panic.
fn print_out(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    match cli.command {
        Command::Check => check(&cli.config),
        Command::Pay(args) => pay(args),
        Command::Ledger { action } => {
            if let LedgerAction::Reconcile { .. } = action {
                logging::init(cli.log_format);
            }
            ledger_command(&cli.config, action)
        }
        Command::Run => {
            logging::init(cli.log_format);
            run(&cli.config)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            let mut out = String::new();
            let upstreams = config.upstreams.len();
            let table = RouteTable::new(config.routes);
            let routes = counted(table.routes().len(), "route");
            line!(out, "{}: OK ({routes}, {})", path.display(), counted(upstreams, "upstream"));
            line!(out, "routes, in match order:");
            line!(out, "  {:<16} {:<32} {:<16} PRICE", "METHODS", "PATH", "UPSTREAM");
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
                            FacilitatorChoice::Local => "facilitator local".to_string(),
                            FacilitatorChoice::Remote(set) => match &set.facilitators[..] {
                                [one] => format!("facilitator {}", redacted_url(&one.url)),
                                several => {
                                    let shown = several
                                        .iter()
                                        .map(|f| format!("{} (weight {})", redacted_url(&f.url), f.weight));
                                    format!("facilitators {}", shown.collect::<Vec<_>>().join(", "))
                                }
                            },
                        };
                        let shadow = match paid.mode {
                            PaymentMode::Enforce => "",
                            PaymentMode::Shadow => "shadow mode: served free, ",
                        };
                        format!("paid ({shadow}settle {settle}, {facilitator})")
                    }
                };
                line!(out, "  {methods:<16} {:<32} {:<16} {price}", route.pattern_text, route.upstream.name);
                if let Some(Pricing::PerToken(metering)) = route.payment.as_ref().map(|p| &p.pricing) {
                    per_token_lines(&mut out, metering);
                    continue;
                }
                let priced = route.payment.iter().flat_map(|p| p.pricing.all_offers());
                for (selector, offers) in priced {
                    let label = match (selector, route.payment.as_ref().map(|p| &p.pricing)) {
                        (Some(value), _) => format!("[{value}] "),
                        (None, Some(Pricing::ByRequest(_))) => "[default] ".to_string(),
                        (None, _) => String::new(),
                    };
                    for offer in offers {
                        offer_line(&mut out, &label, offer);
                    }
                }
            }
            print_out(&out);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One offer in `check`, after `label` (the value that selects it, or "at most " for a cap).
fn offer_line(out: &mut String, label: &str, offer: &x402_gateway::pricing::Offer) {
    line!(
        out,
        "      {label}{} atomic units of {} ({}, {} decimals) on {} to {}, maxTimeoutSeconds {}",
        offer.amount,
        offer.asset.symbol,
        offer.asset.address,
        offer.asset.decimals,
        offer.network.caip2,
        offer.pay_to,
        offer.max_timeout_seconds
    );
}

/// A per-token route in `check`: its `upto` offers at their cap, then each model's rates as configured and in
/// each offer's atomic units per million tokens.
fn per_token_lines(out: &mut String, metering: &x402_gateway::pricing::Metering) {
    let by = metering.source.describe();
    line!(out, "      upto, by the token (model from {by}), at most {} a call:", metering.written.max);
    for offer in &metering.offers {
        offer_line(out, "at most ", offer);
    }
    for listed in metering.listed() {
        let atomic: Vec<String> = metering
            .offers
            .iter()
            .zip(&listed.per_million)
            .map(|(offer, (input, output))| {
                format!("{input} / {output} atomic units of {} on {}", offer.asset.symbol, offer.network.caip2)
            })
            .collect();
        line!(
            out,
            "      [{}] input {}, output {}: per 1M tokens in/out, {}",
            listed.model,
            listed.input,
            listed.output,
            atomic.join("; ")
        );
    }
}

fn pay(args: PayArgs) -> ExitCode {
    let request = match pay_request(args) {
        Ok(request) => request,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else { return ExitCode::FAILURE };
    match runtime.block_on(buyer::pay(&request)) {
        Ok(outcome) => {
            let mut out = format!("HTTP {}\n", outcome.status);
            line!(out, "{}", payment_report(&outcome));
            if let Some(settlement) = &outcome.settlement {
                line!(out, "settlement: {}", serde_json::to_string(settlement).unwrap_or_default());
            }
            line!(out, "\n{}", String::from_utf8_lossy(&outcome.body));
            print_out(&out);
            if outcome.status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What happened to the money: nothing asked, or the payment sent and then settled, refused or not settled.
fn payment_report(outcome: &buyer::PayOutcome) -> String {
    let Some(offer) = &outcome.payment else {
        return "no payment: the resource answered without asking for one".to_string();
    };
    let upto = offer.scheme == buyer::PayScheme::Upto.name();
    let sent = if upto {
        format!(
            "payment sent: upto, at most {} atomic units of {} on {} to {}",
            offer.amount, offer.asset, offer.network, offer.pay_to
        )
    } else {
        format!(
            "payment sent: {} atomic units of {} on {} to {}",
            offer.amount, offer.asset, offer.network, offer.pay_to
        )
    };
    let result = match (&outcome.settlement, &outcome.refusal) {
        // An `upto` charge of 0 sends no transaction.
        (Some(settled), _) if settled.success && upto && settled.transaction.is_empty() => {
            let charged = settled.amount.as_deref().unwrap_or("0");
            format!("settled: charged {charged} atomic units, with no transaction")
        }
        (Some(settled), _) if settled.success && upto => {
            let charged = settled.amount.as_deref().unwrap_or("an unstated amount of");
            format!(
                "settled: charged {charged} atomic units, transaction {} on {}",
                settled.transaction, settled.network
            )
        }
        (Some(settled), _) if settled.success => {
            format!("settled: transaction {} on {}", settled.transaction, settled.network)
        }
        (Some(unsettled), _) => {
            let reason = unsettled.error_reason.as_deref().unwrap_or("no reason given");
            match unsettled.transaction.as_str() {
                "" => format!("not settled: {reason}"),
                transaction => format!(
                    "not settled: {reason}; transaction {transaction}: see whether it landed before paying again"
                ),
            }
        }
        (None, Some(reason)) if reason == buyer::PERMIT2_ALLOWANCE_REQUIRED => format!(
            "refused: {reason}; nothing was charged. An `upto` payment moves the token through Permit2, which this \
             buyer has not approved for {asset}: approve it once (the token's approve(spender = Permit2 {permit2}, \
             amount), from the buyer's address), then pay again. The official clients sign an EIP-2612 permit \
             instead, which this command does not.",
            asset = offer.asset,
            permit2 = x402_proto::upto_evm::PERMIT2,
        ),
        (None, Some(reason)) => format!("refused: {reason}; nothing was charged"),
        (None, None) => "not settled: the answer carries no settlement, so nothing was charged".to_string(),
    };
    format!("{sent}\n{result}")
}

fn ledger_command(path: &std::path::Path, action: LedgerAction) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else { return ExitCode::FAILURE };
    match runtime.block_on(ledger_action(path, action)) {
        Ok(out) => {
            print_out(&out);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Reads only what `action` uses from the configuration: the ledger's path, and the networks' nodes to reconcile.
async fn ledger_action(path: &std::path::Path, action: LedgerAction) -> Result<String, String> {
    let settings = Config::load_ledger(path).map_err(|e| e.to_string())?;
    let store = ledger::Ledger::open(&settings.path).map_err(|e| e.to_string())?;
    let mut out = String::new();
    match action {
        LedgerAction::List { state, route, payer, limit } => {
            let state = match state.as_deref().map(|name| (name, ledger::State::parse(name))) {
                Some((name, None)) => {
                    return Err(format!(
                        "--state {name}: expected verified, settling, settled, failed, refund_needed or released"
                    ))
                }
                Some((_, state)) => state,
                None => None,
            };
            let filtered = state.is_some() || route.is_some() || payer.is_some();
            let rows = store.list(state, route, payer, limit).await.map_err(|e| e.to_string())?;
            if rows.is_empty() {
                let matching = if filtered { " matching these filters" } else { "" };
                line!(out, "no payments{matching} in {}", settings.path.display());
                return Ok(out);
            }
            // AMOUNT is what the buyer authorized (an `upto` ceiling); CHARGED what it pays, once metered.
            line!(
                out,
                "{:>6}  {:<13}  {:<24}  {:<42}  {:<6}  {:>12}  {:>12}  {:>15}  {:<14}  {:<6}  TRANSACTION",
                "ID",
                "STATE",
                "ROUTE",
                "PAYER",
                "SCHEME",
                "AMOUNT",
                "CHARGED",
                "TOKENS IN/OUT",
                "NETWORK",
                "SERVED"
            );
            for r in rows {
                let charged =
                    if r.scheme == "upto" { r.charged.map(|c| c.to_string()) } else { Some(r.charge().to_string()) };
                let tokens = match (r.prompt_tokens, r.completion_tokens) {
                    (None, None) => "-".to_string(),
                    (prompt, completion) => {
                        let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
                        format!("{}/{}", count(prompt), count(completion))
                    }
                };
                line!(
                    out,
                    "{:>6}  {:<13}  {:<24}  {:<42}  {:<6}  {:>12}  {:>12}  {:>15}  {:<14}  {:<6}  {}",
                    r.id,
                    r.state,
                    r.route,
                    r.payer.to_string(),
                    r.scheme,
                    r.amount.to_string(),
                    charged.as_deref().unwrap_or("-"),
                    tokens,
                    r.network,
                    r.served,
                    r.transaction.as_deref().unwrap_or("-")
                );
            }
        }
        LedgerAction::Show { id } => {
            let row = store.get(id).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("no payment {id}"))?;
            line!(out, "{}", serde_json::to_string_pretty(&row).unwrap_or_default());
        }
        LedgerAction::Reconcile { all } => {
            let networks = Config::load_networks(path).map_err(|e| e.to_string())?;
            let chains = x402_gateway::chain::providers(networks.values());
            let now = x402_gateway::replay::unix_now();
            let cutoff = if all { now + 1 } else { now.saturating_sub(300) };
            let report = ledger::reconcile(&store, &chains, settings.reconcile_log_chunk_blocks, cutoff, cutoff)
                .await
                .map_err(|e| e.to_string())?;
            line!(out, "{}", serde_json::to_string(&report).unwrap_or_default());
        }
        LedgerAction::Revenue => {
            let revenue = store.revenue().await.map_err(|e| e.to_string())?;
            if revenue.is_empty() {
                line!(out, "no settled payments in {}", settings.path.display());
                return Ok(out);
            }
            line!(out, "{:<24}  {:<10}  {:<14}  {:<42}  {:>8}  AMOUNT", "ROUTE", "DAY", "NETWORK", "ASSET", "PAYMENTS");
            for r in revenue {
                line!(
                    out,
                    "{:<24}  {:<10}  {:<14}  {:<42}  {:>8}  {}",
                    r.route,
                    r.day,
                    r.network,
                    r.asset,
                    r.payments,
                    r.amount
                );
            }
        }
    }
    Ok(out)
}

/// Everything `pay` needs, checked before any request goes out. Errors never repeat the key.
fn pay_request(args: PayArgs) -> Result<buyer::PayRequest, String> {
    let key = std::env::var(&args.key_env).map_err(|_| format!("environment variable {} is not set", args.key_env))?;
    let signer = key
        .trim()
        .parse::<PrivateKeySigner>()
        .map_err(|_| format!("{} does not hold a 32-byte hex private key", args.key_env))?;
    let mut headers = http::HeaderMap::new();
    for header in &args.headers {
        let (name, value) = header.split_once(':').ok_or_else(|| format!("`{header}`: expected `Name: value`"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("`{name}` is not a header name"))?;
        let value =
            http::HeaderValue::from_str(value.trim()).map_err(|_| format!("`{header}`: invalid header value"))?;
        headers.append(name, value);
    }
    Ok(buyer::PayRequest {
        url: args.url.parse().map_err(|_| format!("`{}` is not a URL", args.url))?,
        method: http::Method::from_bytes(args.method.as_bytes())
            .map_err(|_| format!("`{}` is not a method", args.method))?,
        headers,
        body: args.data.map(bytes::Bytes::from).unwrap_or_default(),
        signer,
        v1: args.v1,
        scheme: args.scheme.map(|scheme| match scheme {
            SchemeArg::Exact => buyer::PayScheme::Exact,
            SchemeArg::Upto => buyer::PayScheme::Upto,
        }),
        max_amount: alloy::primitives::U256::from_str_radix(&args.max_amount, 10)
            .map_err(|_| "--max-amount takes atomic units, such as 100000".to_string())?,
    })
}

fn run(path: &std::path::Path) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else { return ExitCode::FAILURE };
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
        let paid = config.routes.iter().filter(|route| route.payment.is_some()).count();
        tracing::info!(
            config = %path.display(),
            routes = config.routes.len(),
            paid_routes = paid,
            upstreams = config.upstreams.len(),
            ledger = %config.ledger.path.display(),
            "configuration loaded"
        );
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let hangups = match reload_signal() {
            Ok(hangups) => hangups,
            Err(err) => {
                tracing::error!("cannot install the SIGHUP handler: {err}");
                return ExitCode::FAILURE;
            }
        };
        match x402_gateway::pipeline::bind(config).await {
            Ok(server) => {
                tokio::spawn(reload_on(hangups, server.handler().clone(), path.to_path_buf()));
                server.run(shutdown).await;
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("{err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGHUP: re-read the configuration. Registered before the server starts, like the shutdown signals.
#[cfg(unix)]
fn reload_signal() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Applies a valid file to new requests; an invalid one is refused, logged, and changes nothing.
#[cfg(unix)]
async fn reload_on(mut hangups: tokio::signal::unix::Signal, gateway: Arc<Gateway>, path: PathBuf) {
    while hangups.recv().await.is_some() {
        match Config::load(&path) {
            Ok(config) => {
                for warning in &config.warnings {
                    tracing::warn!("{warning}");
                }
                gateway.reload(config);
                tracing::info!(path = %path.display(), "configuration reloaded ([server] listener settings apply at the next restart)");
            }
            Err(err) => tracing::error!("reload refused, the previous configuration keeps serving: {err}"),
        }
    }
}

#[cfg(not(unix))]
fn reload_signal() -> std::io::Result<()> {
    Ok(())
}

#[cfg(not(unix))]
async fn reload_on(_: (), _: Arc<Gateway>, _: PathBuf) {}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every subcommand, with the path of subcommands leading to it.
    fn arguments(command: &clap::Command, path: String, out: &mut Vec<(String, clap::Arg)>) {
        out.extend(command.get_arguments().map(|arg| (path.clone(), arg.clone())));
        for sub in command.get_subcommands() {
            arguments(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_and_argument_has_a_description() {
        let mut command = command();
        command.build();
        command.clone().debug_assert();
        let mut all = Vec::new();
        arguments(&command, "x402-gateway".into(), &mut all);
        let undescribed: Vec<String> = all
            .iter()
            .filter(|(_, arg)| !arg.is_hide_set() && arg.get_help().is_none())
            .map(|(path, arg)| format!("{path} {}", arg.get_id()))
            .collect();
        assert!(undescribed.is_empty(), "without a description in --help: {undescribed:?}");
    }
}
