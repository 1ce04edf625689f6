//! The programs some tests need besides cargo: `anvil` (a local chain), `node` with the official x402 clients
//! and the reference facilitator (`tests/interop`), Permit2's precompiled code (an npm package there too), and
//! the official Python x402 SDK (`.tools/python`). `bash scripts/test.sh` installs them and sets
//! `X402_REQUIRE_TOOLS=1`, under which a missing tool fails the test. Under a plain `cargo test`, a test that
//! needs a missing tool passes without running, after one line on stderr saying what is missing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const RUN_EVERYTHING: &str = "`bash scripts/test.sh` installs the tools and runs every test";

/// The anvil binary: `$X402_ANVIL` if set, else the one `scripts/install-anvil.sh` puts in `.tools/`, else
/// `anvil` on PATH.
pub fn anvil() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("X402_ANVIL") {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!("anvil (X402_ANVIL={} is not an executable)", path.display()))
        };
    }
    let installed = super::repo_path(".tools/anvil/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
    if is_executable(&installed) {
        return Ok(installed);
    }
    on_path("anvil").ok_or_else(|| format!("anvil (neither at {} nor on PATH)", installed.display()))
}

/// Where `@uniswap/v4-periphery` (pinned in `tests/interop/package.json`) keeps Permit2's precompiled runtime code,
/// as one hex literal.
const DEPLOY_PERMIT2: &str =
    "tests/interop/node_modules/@uniswap/v4-periphery/lib/permit2/test/utils/DeployPermit2.sol";

/// The canonical Permit2's runtime code, from the npm package (`scripts/install-interop.sh` installs it).
pub fn permit2_code() -> Result<Vec<u8>, String> {
    let path = super::repo_path(DEPLOY_PERMIT2);
    let Ok(source) = std::fs::read_to_string(&path) else {
        return Err(format!(
            "Permit2's bytecode ({} is missing: @uniswap/v4-periphery is not installed)",
            path.display()
        ));
    };
    // The file holds exactly one literal, `hex"..."`: the code `vm.etch` places at Permit2's address.
    let literal = source
        .split_once("hex\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(hex, _)| hex)
        .unwrap_or_else(|| panic!("{} holds no hex\"...\" literal: not the expected package", path.display()));
    Ok(alloy::hex::decode(literal).unwrap_or_else(|err| panic!("{}: the bytecode is not hex: {err}", path.display())))
}

/// `node`, with the interop harness's packages installed.
pub struct Node {
    program: PathBuf,
}

impl Node {
    /// A command running `tests/interop/{script}`.
    pub fn script(&self, script: &str) -> Command {
        let mut command = Command::new(&self.program);
        command.arg(super::repo_path("tests/interop").join(script));
        command
    }
}

/// `$X402_NODE` if set, else `node` on PATH, and every dependency of `tests/interop/package.json` installed
/// (`scripts/install-interop.sh`).
pub fn node() -> Result<Node, String> {
    let program = match std::env::var_os("X402_NODE") {
        Some(path) if is_executable(Path::new(&path)) => PathBuf::from(path),
        Some(path) => return Err(format!("node (X402_NODE={} is not an executable)", PathBuf::from(path).display())),
        None => on_path("node").ok_or("node (not on PATH)")?,
    };
    let harness = super::repo_path("tests/interop");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(harness.join("package.json")).expect("tests/interop/package.json"),
    )
    .expect("package.json is JSON");
    let dependencies = manifest["dependencies"].as_object().expect("package.json lists dependencies");
    let missing: Vec<&str> = dependencies
        .keys()
        .filter(|name| !harness.join("node_modules").join(name).join("package.json").is_file())
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        Ok(Node { program })
    } else {
        Err(format!("the official x402 clients (not installed in tests/interop/node_modules: {})", missing.join(", ")))
    }
}

/// The official Python x402 SDK's virtual environment, which `scripts/install-python.sh` installs in
/// `.tools/python`.
pub struct Python {
    program: PathBuf,
}

impl Python {
    /// A command running `tests/interop/{script}` with the environment's interpreter.
    pub fn script(&self, script: &str) -> Command {
        let mut command = Command::new(&self.program);
        command.arg(super::repo_path("tests/interop").join(script));
        command
    }
}

/// The environment's python, once `install-python.sh` finished installing it (it writes its stamp last).
pub fn python() -> Result<Python, String> {
    let venv = super::repo_path(".tools/python");
    let program = venv.join("bin/python");
    if is_executable(&program) && venv.join(".x402-installed").is_file() {
        Ok(Python { program })
    } else {
        Err(format!("the official Python x402 SDK (not installed in {})", venv.display()))
    }
}

/// Node for a test that also runs a chain (every test that runs node does): checks both, so that the skip
/// message names everything missing at once.
pub fn require_node() -> Option<Node> {
    match (node(), anvil()) {
        (Ok(node), Ok(_)) => Some(node),
        (node, anvil) => {
            let missing: Vec<String> = [node.err(), anvil.err()].into_iter().flatten().collect();
            skip(&missing.join(" and "))
        }
    }
}

/// Permit2's runtime code for a test that places it on a chain: checks anvil too, so that the skip message names
/// everything missing at once.
pub fn require_permit2() -> Option<Vec<u8>> {
    match (permit2_code(), anvil()) {
        (Ok(code), Ok(_)) => Some(code),
        (code, anvil) => {
            let missing: Vec<String> = [code.err(), anvil.err()].into_iter().flatten().collect();
            skip(&missing.join(" and "))
        }
    }
}

/// `found`, or `None` once the test is reported skipped for want of it.
pub fn require<T>(found: Result<T, String>) -> Option<T> {
    found.map_or_else(|missing| skip(&missing), Some)
}

fn skip<T>(missing: &str) -> Option<T> {
    // libtest names each test's thread after the test.
    let test = format!("{}::{}", env!("CARGO_CRATE_NAME"), std::thread::current().name().unwrap_or("?"));
    if std::env::var_os("X402_REQUIRE_TOOLS").is_some_and(|value| !value.is_empty() && value != "0") {
        panic!("{test} needs {missing}, and X402_REQUIRE_TOOLS is set: nothing may be skipped");
    }
    // Written to the stream itself: the harness keeps what a passing test prints with eprintln! to itself.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs {missing}; {RUN_EVERYTHING}");
    None
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
