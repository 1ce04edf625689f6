//! The real binary: `check` on good and bad files, the config path from the environment, and `run` stopping
//! cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_x402-gateway");

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// Writes `toml` as `gateway.toml` in a fresh folder under the target directory and returns its path.
fn write_config(toml: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cli-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("create test folder");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// The binary with an environment that cannot interfere: no config path or log filter inherited.
fn gateway() -> Command {
    let mut command = Command::new(BIN);
    command.env_remove("X402_GATEWAY_CONFIG").env_remove("RUST_LOG");
    command
}

fn output(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("run x402-gateway");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn check(path: &PathBuf) -> (Output, String, String) {
    output(gateway().arg("check").arg("--config").arg(path))
}

const VALID: &str = r#"[server]
listen = "127.0.0.1:0"
[upstreams.llm]
url = "http://127.0.0.1:9/v1"
[upstreams.files]
url = "https://files.example.com"
[[routes]]
path = "/v1/chat"
methods = ["POST"]
upstream = "llm"
[[routes]]
path = "/files/*"
methods = ["GET", "head"]
upstream = "files"
[[routes]]
path = "/misc/:id"
upstream = "llm"
"#;

#[test]
fn check_prints_every_route() {
    let path = write_config(VALID);
    let (out, stdout, stderr) = check(&path);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    for (route, methods, upstream) in [
        ("/v1/chat", &["POST"][..], "llm"),
        ("/files/*", &["GET", "HEAD"][..], "files"),
        ("/misc/:id", &["*"][..], "llm"),
    ] {
        let line = stdout
            .lines()
            .find(|line| line.split_whitespace().any(|word| word == route))
            .unwrap_or_else(|| panic!("no line for route {route} in:\n{stdout}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(words.contains(&upstream), "route {route}: upstream {upstream} missing from {line:?}");
        for method in methods {
            assert!(
                words.iter().any(|word| word.split(',').any(|m| m == *method)),
                "route {route}: method {method} missing from {line:?}"
            );
        }
    }
}

#[test]
fn check_warns_about_an_upstream_no_route_uses() {
    let (result, _, stderr) =
        check(&write_config(&format!("{VALID}[upstreams.spare]\nurl = \"http://127.0.0.1:9\"\n")));
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("warning: upstreams.spare: no route uses it"), "{stderr}");
    let (_, _, stderr) = check(&write_config(VALID));
    assert!(!stderr.contains("warning"), "every upstream of VALID is used: {stderr}");
}

#[test]
fn check_names_the_key_and_the_missing_variable() {
    let path = write_config(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.paid]
url = "http://127.0.0.1:9"
headers = { Authorization = "Bearer ${T_CLI_MISSING_VAR}" }
[[routes]]
path = "/*"
upstream = "paid"
"#,
    );
    let (out, stdout, stderr) =
        output(gateway().env_remove("T_CLI_MISSING_VAR").args(["check", "--config"]).arg(&path));
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("upstreams.paid.headers.Authorization"), "key not named: {stderr}");
    assert!(stderr.contains("T_CLI_MISSING_VAR"), "variable not named: {stderr}");
}

#[test]
fn check_errors_never_print_an_expanded_secret() {
    let secret = "sk-cli-secret-9f3a61c0";
    let path = write_config(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.paid]
url = "http://127.0.0.1:9"
headers = { Authorization = "Bearer ${T_CLI_SECRET}" }
query = { key = "${T_CLI_SECRET}" }
[[routes]]
path = "/*"
upstream = "unknown"
"#,
    );
    let (out, stdout, stderr) = output(gateway().env("T_CLI_SECRET", secret).args(["check", "--config"]).arg(&path));
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("routes[0].upstream"), "route key not named: {stderr}");
    assert!(!stderr.contains(secret), "secret on stderr: {stderr}");
    assert!(!stdout.contains(secret), "secret on stdout: {stdout}");
}

#[test]
fn check_reports_the_line_of_a_syntax_error() {
    let path = write_config("[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.a]\nurl = \"http://127.0.0.1:9\n");
    let (out, stdout, stderr) = check(&path);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("line 4"), "no line number: {stderr}");
}

#[test]
fn check_shows_a_facilitator_url_without_its_key() {
    let key = "sk-cli-facilitator-7c1d";
    let path = write_config(&format!(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "base-sepolia"
asset = "USDC"
facilitator = "https://facilitator.example/v2/{key}"
[[routes]]
path = "/paid"
upstream = "api"
amount = "1000"
[[routes]]
path = "/other"
upstream = "api"
amount = "1000"
facilitator = "https://user:{key}@other.example:8443/x402?apikey={key}"
"#
    ));
    let (out, stdout, stderr) = check(&path);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains(key) && !stderr.contains(key), "the key is printed: {stdout}{stderr}");
    assert!(stdout.contains("facilitator https://facilitator.example/<redacted>"), "{stdout}");
    assert!(stdout.contains("facilitator https://other.example:8443/<redacted>"), "{stdout}");
}

#[test]
fn check_shows_each_facilitator_of_a_list_with_its_weight_and_without_its_key_or_auth() {
    let key = "sk-cli-facilitators-91ab";
    let path = write_config(&format!(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "base-sepolia"
asset = "USDC"
facilitators = [
  {{ url = "https://facilitator.example/v2/{key}", auth = "Bearer {key}", weight = 3 }},
  {{ url = "https://backup.example:8443" }},
]
[[routes]]
path = "/paid"
upstream = "api"
amount = "1000"
"#
    ));
    let (out, stdout, stderr) = check(&path);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains(key) && !stderr.contains(key), "the key is printed: {stdout}{stderr}");
    let shown =
        "facilitators https://facilitator.example/<redacted> (weight 3), https://backup.example:8443 (weight 1)";
    assert!(stdout.contains(shown), "{stdout}");
}

#[test]
fn check_prints_a_per_token_routes_cap_and_rates() {
    let path = write_config(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.llm]
url = "http://127.0.0.1:9/v1"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "base-sepolia"
asset = "USDC"
facilitator = "https://facilitator.example"
[[routes]]
path = "/v1/chat/completions"
methods = ["POST"]
upstream = "llm"
price = { by = "body.model", per_token = { "gpt-4o-mini" = { input = "$0.15/1M", output = "$0.60/1M" }, "o1" = { input = "$15/1M", output = "$0.00006" } }, max = "$0.50" }
"#,
    );
    let (out, stdout, stderr) = check(&path);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    let usdc = "USDC on eip155:84532";
    for expected in [
        "upto, by the token (model from body.model), at most $0.50 a call:".to_string(),
        "at most 500000 atomic units of USDC (0x036CbD53842c5426634e7929541eC2318f3dCF7e, 6 decimals) on eip155:84532"
            .to_string(),
        format!("[gpt-4o-mini] input $0.15/1M, output $0.60/1M: per 1M tokens in/out, 150000 / 600000 atomic units of {usdc}"),
        format!("[o1] input $15/1M, output $0.00006: per 1M tokens in/out, 15000000 / 60000000 atomic units of {usdc}"),
    ] {
        assert!(stdout.lines().any(|line| line.trim() == expected || line.trim().starts_with(&expected)), "{expected}\nin:\n{stdout}");
    }
}

#[test]
fn a_syntax_error_on_a_line_with_a_secret_names_the_place_but_not_the_secret() {
    let secret = "sk-cli-syntax-5e0b";
    let path = write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.a]\nurl = \"http://127.0.0.1:9\"\n\
         headers = {{ Authorization = \"Bearer {secret}\" X = 1 }}\n"
    ));
    let (out, stdout, stderr) = check(&path);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains(secret) && !stdout.contains(secret), "the secret is printed: {stderr}");
    assert!(stderr.contains("line 5, column"), "no line and column: {stderr}");
    assert!(stderr.contains("headers = { Authorization = \"***\" X = 1 }"), "the line, masked: {stderr}");
}

#[test]
fn check_refuses_an_unknown_key() {
    let path = write_config("[server]\nlistn = \"127.0.0.1:0\"\n");
    let (out, stdout, stderr) = check(&path);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("listn"), "unknown key not named: {stderr}");
}

#[test]
fn config_path_comes_from_the_environment() {
    let path = write_config(VALID);
    // Run from an empty folder so that the default `gateway.toml` cannot be what was read.
    let cwd = path.parent().expect("config folder").join("elsewhere");
    std::fs::create_dir_all(&cwd).expect("create working folder");
    let (out, stdout, stderr) = output(gateway().current_dir(&cwd).env("X402_GATEWAY_CONFIG", &path).arg("check"));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains(&path.display().to_string()),
        "the checked file is not the one from X402_GATEWAY_CONFIG: {stdout}"
    );
    assert!(stdout.contains("/v1/chat"), "routes not printed: {stdout}");
}

/// Waits for the child to exit, killing it (by its own handle) if it has not within `limit`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("x402-gateway did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `x402-gateway run` on `path`, once it listens: the process, its plain HTTP address, its log up to then (JSON
/// events), and its log lines from then on.
struct Running {
    child: std::process::Child,
    addr: SocketAddr,
    started: Vec<serde_json::Value>,
    lines: mpsc::Receiver<String>,
}

fn start_run(path: &PathBuf) -> Running {
    let mut child = gateway()
        .args(["--log-format", "json", "run", "--config"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start x402-gateway run");

    // Read the log on a thread (it also keeps the pipe drained) and learn the bound address from it.
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = String::new();
    let mut started = Vec::new();
    let addr: SocketAddr = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines_rx.recv_timeout(remaining) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no `listening` log line within 10 s; log so far:\n{log}");
        };
        log.push_str(&line);
        log.push('\n');
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        started.push(event.clone());
        if event["message"] == "listening" && event["kind"] == "http" {
            break event["addr"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no address in {line}"));
        }
    };

    Running { child, addr, started, lines: lines_rx }
}

#[test]
fn run_serves_and_stops_with_exit_0_on_sigterm() {
    let path = write_config(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
[[routes]]
path = "/api/*"
upstream = "api"
"#,
    );
    let Running { mut child, addr, started, lines } = start_run(&path);
    // It said what it loaded before listening.
    let loaded = started.iter().find(|e| e["message"] == "configuration loaded").expect("a configuration line");
    assert_eq!(loaded["config"], path.display().to_string());
    assert_eq!((&loaded["routes"], &loaded["paid_routes"], &loaded["upstreams"]), (&1.into(), &0.into(), &1.into()));
    assert_eq!(loaded["ledger"], path.parent().unwrap().join("data/ledger.db").display().to_string());

    // It serves: a path without a route gets the gateway's own 404.
    let mut tcp = TcpStream::connect(addr).expect("connect to the running gateway");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    tcp.write_all(b"GET /nowhere HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send request");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("read answer");
    assert!(answer.starts_with("HTTP/1.1 404"), "unexpected answer: {answer}");
    assert!(answer.contains("no_route"), "unexpected answer: {answer}");

    // Its access-log line, in the shape of the other JSON log lines.
    let access = loop {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect("an access-log line");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if event["target"] == "access" {
            break event;
        }
    };
    assert_eq!(access["level"], "INFO");
    assert!(access["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{access}");
    assert_eq!(
        (&access["method"], &access["path"], &access["route"]),
        (&"GET".into(), &"/nowhere".into(), &"-".into())
    );
    assert_eq!((&access["status"], &access["client"]), (&404.into(), &"127.0.0.1".into()));
    assert!(access["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{access}");
    assert!(access.get("payer").is_none(), "a free request has no payer: {access}");

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(kill.success(), "kill -TERM failed");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status:?}");
    // Its last word says it stopped.
    let last = lines.iter().last().expect("log lines after the access line");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&last).unwrap()["message"], "stopped", "{last}");
}

#[test]
fn check_counts_in_words_and_an_empty_ledger_says_so() {
    let (_, stdout, _) = check(&write_config(VALID));
    assert!(stdout.contains(": OK (3 routes, 2 upstreams)"), "{stdout}");
    let single = write_config("[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.a]\nurl = \"http://127.0.0.1:9\"\n[[routes]]\npath = \"/a\"\nupstream = \"a\"\n");
    let (_, stdout, _) = check(&single);
    assert!(stdout.contains(": OK (1 route, 1 upstream)"), "{stdout}");
    let ledger = single.parent().unwrap().join("data/ledger.db");
    for (args, said) in [
        (vec!["ledger", "list"], format!("no payments in {}\n", ledger.display())),
        (
            vec!["ledger", "list", "--state", "settled"],
            format!("no payments matching these filters in {}\n", ledger.display()),
        ),
        (vec!["ledger", "revenue"], format!("no settled payments in {}\n", ledger.display())),
    ] {
        let (result, stdout, stderr) = output(gateway().args(&args).arg("--config").arg(&single));
        assert!(result.status.success(), "{args:?}: {stderr}");
        assert_eq!(stdout, said, "{args:?}");
    }
}

#[test]
fn the_shipped_gateway_toml_is_valid_and_needs_no_secrets() {
    // Only `check`: the shipped file fronts a public API and facilitator, and tests stay on loopback.
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let (result, stdout, stderr) = output(gateway().args(["check", "--config"]).arg(&shipped).env("PAY_TO", SELLER));
    assert!(result.status.success(), "{stderr}");
    assert!(stdout.contains("/v1/forecast") && stdout.contains("free"), "{stdout}");
    assert!(stdout.contains("/paid/*") && stdout.contains("facilitator https://x402.org/<redacted>"), "{stdout}");
    assert!(stdout.contains("1000 atomic units of USDC"), "{stdout}");
}

#[test]
fn the_resale_examples_are_valid() {
    for (example, needle) in [
        ("openai", "[gpt-4o-mini] 2000 atomic units"),
        ("openai-per-token", "upto, by the token"),
        ("anthropic", "[default] 50000 atomic units"),
        ("firecrawl", "10000 atomic units"),
        ("docker", "1000 atomic units"),
    ] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{example}.toml"));
        let (result, stdout, stderr) = output(
            gateway()
                .args(["check", "--config"])
                .arg(&path)
                .env("OPENAI_API_KEY", "k")
                .env("ANTHROPIC_API_KEY", "k")
                .env("FIRECRAWL_API_KEY", "k")
                .env("ECHO_API_KEY", "k")
                .env("PAY_TO", SELLER),
        );
        assert!(result.status.success(), "{example}: {stderr}");
        assert!(stdout.contains(needle), "{example}: {stdout}");
        assert!(stdout.contains(&format!("to {SELLER}")), "{example} pays the address in PAY_TO: {stdout}");
    }
}

/// An address of the seller's own (no published key).
const SELLER: &str = "0x1111111111111111111111111111111111111111";
/// Account 3 of the public anvil/hardhat mnemonic: its private key is on the internet.
const DEVELOPMENT_ACCOUNT: &str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";

fn check_with_payee(example: &str, pay_to: Option<&str>) -> (Output, String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{example}.toml"));
    let mut command = gateway();
    command.args(["check", "--config"]).arg(&path).env("OPENAI_API_KEY", "k").env("ECHO_API_KEY", "k");
    match pay_to {
        Some(pay_to) => command.env("PAY_TO", pay_to),
        None => command.env_remove("PAY_TO"),
    };
    output(&mut command)
}

#[test]
fn a_published_development_key_is_refused_as_a_mainnet_payee_and_warned_about_on_a_testnet() {
    // openai.toml sells on Base mainnet, docker.toml on Base Sepolia.
    let (result, _, stderr) = check_with_payee("openai", Some(DEVELOPMENT_ACCOUNT));
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("routes[0].pay_to") && stderr.contains("private key is published"), "{stderr}");
    assert!(stderr.contains("eip155:8453"), "{stderr}");
    let (result, _, stderr) = check_with_payee("docker", Some(DEVELOPMENT_ACCOUNT));
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("warning: routes[1] (/paid/*)") && stderr.contains("eip155:84532"), "{stderr}");
    let (result, _, stderr) = check_with_payee("docker", Some(SELLER));
    assert!(result.status.success() && !stderr.contains("warning"), "{stderr}");
    // Without PAY_TO, the examples say what is missing rather than pay anyone.
    let (result, _, stderr) = check_with_payee("openai", None);
    assert_eq!(result.status.code(), Some(1));
    assert!(stderr.contains("pay_to: environment variable PAY_TO is not set"), "{stderr}");

    // `run` refuses too, before it listens; on a local development chain the same account is fine.
    let mainnet = write_config(&paid_config("1000").replace("base-sepolia", "eip155:8453"));
    let mut run = gateway()
        .args(["run", "--config"])
        .arg(&mainnet)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start x402-gateway run");
    let status = wait_exit(&mut run, Duration::from_secs(10));
    let mut stderr = String::new();
    run.stderr.take().expect("piped stderr").read_to_string(&mut stderr).expect("read stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("private key is published"), "{stderr}");
    let local = paid_config("1000").replace("base-sepolia", "eip155:31337")
        + "[networks.\"eip155:31337\".assets.USDC]\naddress = \"0x5FbDB2315678afecb367f032d93f642f64180aa3\"\n\
           decimals = 6\neip712_name = \"USD Coin\"\neip712_version = \"2\"\n";
    let (result, _, stderr) = check(&write_config(&local));
    assert!(result.status.success() && !stderr.contains("warning"), "{stderr}");
}

/// `--help` of a (sub)command, as the binary prints it.
fn help(args: &[&str]) -> String {
    let (result, stdout, stderr) = output(gateway().args(args).arg("--help"));
    assert!(result.status.success(), "{stderr}");
    stdout
}

#[test]
fn global_flags_go_before_or_after_the_subcommand_and_show_only_where_they_apply() {
    let path = write_config(VALID);
    let path = path.to_str().unwrap();
    for args in [
        vec!["ledger", "list", "--config", path],
        vec!["--config", path, "ledger", "list"],
        vec!["ledger", "--config", path, "list", "--limit", "5"],
        vec!["check", "-c", path],
        vec!["-c", path, "check"],
    ] {
        let (result, _, stderr) = output(gateway().args(&args));
        assert!(result.status.success(), "{args:?}: {stderr}");
    }
    // After the subcommand, --log-format still switches the log to JSON.
    let mut run = gateway()
        .args(["run", "--config", path, "--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start x402-gateway run");
    let first = BufReader::new(run.stderr.take().expect("piped stderr")).lines().next();
    let _ = run.kill();
    let _ = run.wait();
    let first = first.expect("a log line").expect("readable");
    assert!(serde_json::from_str::<serde_json::Value>(&first).is_ok(), "not JSON: {first}");

    for (args, config, log_format) in [
        (vec!["run"], true, true),
        (vec!["check"], true, false),
        (vec!["pay"], false, false),
        (vec!["ledger", "list"], true, false),
        (vec!["ledger", "show"], true, false),
        (vec!["ledger", "revenue"], true, false),
        (vec!["ledger", "reconcile"], true, true),
    ] {
        let text = help(&args);
        assert_eq!(text.contains("--config"), config, "{args:?}: {text}");
        assert_eq!(text.contains("--log-format"), log_format, "{args:?}: {text}");
    }
}

#[test]
fn commands_that_only_read_the_ledger_need_no_secret() {
    // Every secret, and the payee, comes from a variable that is not set.
    let path = write_config(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
headers = { Authorization = "Bearer ${X402_TEST_UNSET_API_KEY}" }
[payment]
pay_to = "${X402_TEST_UNSET_PAY_TO}"
network = "eip155:84532"
asset = "USDC"
facilitator = "local"
[networks."eip155:84532"]
rpc_url = "http://127.0.0.1:9"
settler_key = "${X402_TEST_UNSET_SETTLER_KEY}"
[[routes]]
path = "/paid"
upstream = "api"
price = "$0.001"
"#,
    );
    let (result, _, stderr) = check(&path);
    assert_eq!(result.status.code(), Some(1), "serving needs them: {stderr}");
    for action in [vec!["list"], vec!["revenue"], vec!["reconcile"]] {
        let (result, stdout, stderr) = output(gateway().args(["ledger", "--config"]).arg(&path).args(&action));
        assert!(result.status.success(), "ledger {action:?}: {stderr}");
        assert!(!stdout.is_empty(), "ledger {action:?} prints its report");
    }
    let (result, _, stderr) = output(gateway().args(["ledger", "--config"]).arg(&path).args(["show", "1"]));
    assert_eq!(result.status.code(), Some(1));
    assert!(stderr.contains("no payment 1") && !stderr.contains("X402_TEST_UNSET"), "{stderr}");
}

fn paid_config(amount: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "base-sepolia"
asset = "USDC"
facilitator = "http://127.0.0.1:9"
[[routes]]
path = "/paid"
upstream = "api"
amount = "{amount}"
"#
    )
}

/// The amount the gateway at `addr` asks for `/paid` now (from the v1 body of its 402).
fn asked_amount(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    tcp.write_all(b"GET /paid HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("read");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_else(|| panic!("no body: {answer}"));
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    json["accepts"][0]["maxAmountRequired"].as_str().expect("an amount").to_string()
}

fn hang_up(child: &std::process::Child) {
    let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().expect("kill -HUP");
    assert!(status.success());
}

#[test]
fn sighup_reloads_a_valid_file_and_refuses_an_invalid_one() {
    let path = write_config(&paid_config("1000"));
    let Running { mut child, addr, lines, .. } = start_run(&path);
    assert_eq!(asked_amount(addr), "1000");

    std::fs::write(&path, paid_config("2500")).expect("rewrite");
    hang_up(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked_amount(addr) != "2500" {
        assert!(Instant::now() < deadline, "the new price never showed");
        std::thread::sleep(Duration::from_millis(20));
    }

    std::fs::write(&path, "[server\nlisten = ").expect("break the file");
    hang_up(&child);
    let refused = loop {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect("a log line about the refused reload");
        if line.contains("reload refused") {
            break line;
        }
    };
    assert!(refused.contains("line"), "the error says where: {refused}");
    assert_eq!(asked_amount(addr), "2500", "an invalid file changes nothing");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
    assert!(status.success());
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)).code(), Some(0));
}

/// A process's memory figure from /proc (`VmRSS`, `VmHWM`), in bytes.
fn memory_of(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB");
    kib * 1024
}

#[test]
fn unpaid_bodies_cannot_pin_memory_beyond_the_buffer_budget() {
    const MAX_BODY: usize = 4 * 1024 * 1024;
    const BUDGET: u64 = 8 * 1024 * 1024;
    let path = write_config(&format!(
        r#"[server]
listen = "127.0.0.1:0"
max_body_bytes = {MAX_BODY}
max_buffered_body_bytes = {BUDGET}
[upstreams.api]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
network = "eip155:84532"
asset = "USDC"
facilitator = "http://127.0.0.1:9"
[[routes]]
path = "/chat"
upstream = "api"
price = {{ by = "body.model", table = {{ cheap = "$0.001" }} }}
"#
    ));
    let Running { mut child, addr, .. } = start_run(&path);
    std::thread::sleep(Duration::from_millis(300));
    let before = memory_of(child.id(), "VmRSS:");

    // 30 buyers who never pay, each sending all but the last byte of a body just under the limit: half of
    // them declare its length, half send it chunked. Each holds its connection open.
    let attackers: Vec<_> = (0..30)
        .map(|i| {
            std::thread::spawn(move || {
                let mut tcp = TcpStream::connect(addr).expect("connect");
                tcp.set_write_timeout(Some(Duration::from_secs(5))).expect("write timeout");
                let chunked = i % 2 == 1;
                let head = match chunked {
                    true => "POST /chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(),
                    false => format!("POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", MAX_BODY - 1),
                };
                if tcp.write_all(head.as_bytes()).is_err() {
                    return tcp;
                }
                let piece = vec![b' '; 64 * 1024];
                for _ in 0..(MAX_BODY - 2) / piece.len() {
                    let sent = match chunked {
                        true => tcp.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).and_then(|()| {
                            tcp.write_all(&piece)?;
                            tcp.write_all(b"\r\n")
                        }),
                        false => tcp.write_all(&piece),
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                tcp
            })
        })
        .collect();
    let held: Vec<TcpStream> = attackers.into_iter().map(|a| a.join().expect("attacker thread")).collect();
    std::thread::sleep(Duration::from_millis(500));
    let peak = memory_of(child.id(), "VmHWM:");
    let grown = peak.saturating_sub(before);
    // The budget plus what 30 connections and their answers cost; without a budget it is about 120 MB.
    assert!(grown < BUDGET + 24 * 1024 * 1024, "the gateway grew by {} MB", grown / (1024 * 1024));
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn requests_hyper_refuses_itself_get_an_access_line() {
    let path = write_config(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_header_bytes = 8192\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n\
         [[routes]]\npath = \"/*\"\nupstream = \"api\"\n",
    );
    let Running { mut child, addr, lines, .. } = start_run(&path);
    let send = |request: &[u8]| {
        let mut tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        tcp.write_all(request).expect("send");
        let mut answer = String::new();
        let _ = tcp.read_to_string(&mut answer);
        answer
    };
    assert!(send(b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    assert!(send(huge.as_bytes()).starts_with("HTTP/1.1 431"));
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect("an access-log line");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if event["target"] == "access" {
            assert_eq!(event["client"], "127.0.0.1", "{event}");
            statuses.push(event["status"].as_u64().expect("a status"));
        }
    }
    // Each connection may be served by another worker thread, and each thread writes its own lines.
    statuses.sort_unstable();
    assert_eq!(statuses, [400, 431]);
    let _ = child.kill();
    let _ = child.wait();
}
