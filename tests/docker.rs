//! The Docker image, without a container engine: its build stage's `cargo build` runs on exactly the files
//! the Dockerfile copies, and the binary runs as the image's unprivileged user in the image's layout (a chroot
//! with `examples/docker.toml` as its configuration) up to a served request.

mod common;

use common::spawn_echo;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A Dockerfile's instructions (keyword, arguments), continuation lines joined, comments dropped, split into
/// its stages at each `FROM`.
struct Dockerfile {
    stages: Vec<Vec<(String, String)>>,
}

impl Dockerfile {
    fn read() -> Dockerfile {
        let text = std::fs::read_to_string(common::repo_path("Dockerfile")).expect("read the Dockerfile");
        let mut stages: Vec<Vec<(String, String)>> = Vec::new();
        let mut pending = String::new();
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            match line.strip_suffix('\\') {
                Some(part) => pending.push_str(part),
                None => {
                    pending.push_str(line);
                    let instruction = std::mem::take(&mut pending);
                    let Some((keyword, args)) = instruction.trim().split_once(char::is_whitespace) else { continue };
                    let keyword = keyword.to_ascii_uppercase();
                    if keyword == "FROM" {
                        stages.push(Vec::new());
                    }
                    stages.last_mut().expect("FROM comes first").push((keyword, args.trim().to_string()));
                }
            }
        }
        Dockerfile { stages }
    }

    /// The arguments of every `keyword` instruction of stage `stage`.
    fn all<'a>(&'a self, stage: usize, keyword: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.stages[stage].iter().filter(move |(k, _)| k == keyword).map(|(_, args)| args.as_str())
    }

    fn one<'a>(&'a self, stage: usize, keyword: &'a str) -> &'a str {
        let all: Vec<&str> = self.all(stage, keyword).collect();
        assert_eq!(all.len(), 1, "one {keyword} in stage {stage}: {all:?}");
        all[0]
    }

    fn runtime(&self) -> usize {
        self.stages.len() - 1
    }
}

/// A JSON-array instruction argument (`["x402-gateway"]`).
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"))
}

/// Copies `from` (a file, or a folder's contents) to `to`, as `COPY` does.
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}

/// Waits for `child` to exit, killing it (by its own handle) if it has not within `limit`.
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_build_stage_compiles_from_exactly_the_files_it_copies() {
    let dockerfile = Dockerfile::read();
    let context = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("docker-build-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).unwrap();
    for copy in dockerfile.all(0, "COPY") {
        let mut sources: Vec<&str> = copy.split_whitespace().collect();
        let destination = sources.pop().expect("a destination");
        assert!(!sources.iter().any(|p| p.starts_with("--")), "a plain COPY from the build context: {copy}");
        // Relative to WORKDIR, which the context folder stands for. A folder's contents go into the destination;
        // files go into it when it names a folder (a trailing `/`, or several sources), else become it.
        let into_folder = destination.ends_with('/') || sources.len() > 1;
        let destination = context.join(destination.trim_start_matches("./"));
        for source in &sources {
            let source = common::repo_path(source);
            let into = match source.file_name() {
                Some(name) if into_folder && source.is_file() => destination.join(name),
                _ => destination.clone(),
            };
            copy_tree(&source, &into);
        }
    }
    let run: Vec<&str> = dockerfile.one(0, "RUN").split_whitespace().collect();
    assert_eq!(&run[..2], ["cargo", "build"], "the build stage runs cargo build: {run:?}");
    // `cargo check` with the build's own flags: the same manifest, lock file, targets and sources are read and
    // compiled, without code generation. Not `--release`, and in this repository's target folder, so that the
    // dependencies compiled for the other tests are reused; `--offline`: they are all on this machine already.
    let mut args: Vec<&str> = vec!["check", "--offline"];
    args.extend(run[2..].iter().copied().filter(|a| *a != "--release"));
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("the target folder");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .current_dir(&context)
        .env("CARGO_TARGET_DIR", target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cargo");
    let mut stderr = cargo.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_bounded(&mut cargo, Duration::from_secs(900), "cargo check of the Docker build context");
    let log = log.join().unwrap();
    assert!(status.success(), "cargo {} in the Docker build context failed:\n{log}", args.join(" "));
}

/// The runtime user as (uid, gid): `USER`, numeric or the name a `useradd --uid N` line creates.
fn runtime_user(dockerfile: &Dockerfile) -> (u32, u32) {
    let user = dockerfile.one(dockerfile.runtime(), "USER");
    let (name, group) = user.split_once(':').map_or((user, None), |(u, g)| (u, Some(g)));
    let option = |command: &str, flag: &str| -> Option<u32> {
        let words: Vec<&str> = command.split_whitespace().collect();
        words.windows(2).find(|w| w[0] == flag).and_then(|w| w[1].parse().ok())
    };
    let useradd = dockerfile
        .all(dockerfile.runtime(), "RUN")
        .flat_map(|run| run.split("&&"))
        .find(|command| command.trim_start().starts_with("useradd") && command.split_whitespace().last() == Some(name));
    let uid = name.parse().ok().or_else(|| useradd.and_then(|c| option(c, "--uid"))).expect("the user's uid");
    let gid = group.and_then(|g| g.parse().ok()).or_else(|| useradd.and_then(|c| option(c, "--gid"))).unwrap_or(uid);
    (uid, gid)
}

fn is_root() -> bool {
    let id = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&id.stdout).trim() == "0"
}

/// The shared libraries `binary` loads, as `ldd` resolves them on this machine.
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let ldd = Command::new("ldd").arg(binary).output().expect("run ldd");
    String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')).map(PathBuf::from))
        .collect()
}

/// Replaces `from` (which must be there) with `to` in `text`.
fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "examples/docker.toml no longer has `{from}`");
    text.replace(from, to)
}

#[tokio::test]
async fn the_image_layout_serves_as_its_unprivileged_user() {
    if !is_root() {
        eprintln!("skipped: building a chroot and switching to the image's user needs root");
        return;
    }
    let dockerfile = Dockerfile::read();
    let runtime = dockerfile.runtime();
    let (uid, gid) = runtime_user(&dockerfile);
    assert_ne!(uid, 0, "the image runs as a non-root user");
    let upstream = spawn_echo("echo").await;

    // The image's file system: the binary where the build stage's result is copied, its libraries, the mounted
    // configuration (read-only, owned by root), and the data volume, owned by the runtime user.
    let root = common::test_dir().join("image");
    let copy = dockerfile.all(runtime, "COPY").find(|c| c.starts_with("--from=")).expect("COPY --from=build");
    let binary_in_image = copy.split_whitespace().last().unwrap().trim_start_matches('/');
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_x402-gateway"));
    copy_tree(&binary, &root.join(binary_in_image));
    for library in libraries(&binary) {
        copy_tree(&library, &root.join(library.strip_prefix("/").unwrap()));
    }
    let env: Vec<(String, String)> = dockerfile
        .all(runtime, "ENV")
        .map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).expect("ENV KEY=value"))
        .collect();
    let config_path = &env.iter().find(|(k, _)| k == "X402_GATEWAY_CONFIG").expect("X402_GATEWAY_CONFIG").1;
    // Only what cannot work on a test machine changes: loopback ports the kernel picks, the test's echo server
    // for the compose service, and no facilitator beyond this machine.
    let example = std::fs::read_to_string(common::repo_path("examples/docker.toml")).unwrap();
    let config = replace(&example, "listen = \"0.0.0.0:8402\"", "listen = \"127.0.0.1:0\"");
    let config = replace(&config, "admin_listen = \"0.0.0.0:9402\"", "admin_listen = \"127.0.0.1:0\"");
    let config = replace(&config, "url = \"http://echo:80\"", &format!("url = \"{}\"", upstream.url()));
    let config = replace(&config, "\"https://x402.org/facilitator\"", "\"http://127.0.0.1:9\"");
    let config_file = root.join(config_path.trim_start_matches('/'));
    std::fs::create_dir_all(config_file.parent().unwrap()).unwrap();
    std::fs::write(&config_file, config).unwrap();
    let volumes: Vec<String> = exec_form(dockerfile.one(runtime, "VOLUME"));
    let compose = std::fs::read_to_string(common::repo_path("docker-compose.yml")).unwrap();
    for volume in &volumes {
        assert!(compose.contains(&format!(":{volume}")), "docker-compose.yml mounts a volume on {volume}");
        let dir = root.join(volume.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    }

    let command: Vec<String> =
        [exec_form(dockerfile.one(runtime, "ENTRYPOINT")), exec_form(dockerfile.one(runtime, "CMD"))].concat();
    let mut gateway = Command::new("chroot")
        .arg(format!("--userspec={uid}:{gid}"))
        .arg(&root)
        .args(&command)
        .env_clear()
        .envs(env.iter().cloned())
        // debian:bookworm-slim's PATH (chroot itself is found with it too).
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("PAY_TO", "0x1111111111111111111111111111111111111111")
        .env("ECHO_API_KEY", "operator-key")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chroot");
    let stderr = gateway.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = loop {
        let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = gateway.kill();
            let _ = gateway.wait();
            panic!("the gateway exited, or did not listen within 20 s; its log:\n{log}");
        };
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening") && line.contains("kind=\"http\"") {
            let addr = line.split("addr=").nth(1).and_then(|rest| rest.split_whitespace().next());
            break addr.and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("no address in {line}"));
        }
    };

    let free = tokio::task::spawn_blocking(move || http_get(addr, "/free/hello")).await.unwrap();
    assert!(free.starts_with("HTTP/1.1 200"), "{free}\n{log}");
    assert!(free.contains("Bearer operator-key"), "the operator's key reaches the upstream: {free}");
    let paid = tokio::task::spawn_blocking(move || http_get(addr, "/paid/hello")).await.unwrap();
    assert!(paid.starts_with("HTTP/1.1 402"), "{paid}");

    let ledger = root.join(volumes[0].trim_start_matches('/')).join("ledger.db");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&ledger).expect("the ledger is in the volume"));
    assert_eq!(owner, uid, "the ledger belongs to the runtime user");
    let kill = Command::new("kill").args(["-TERM", &gateway.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = wait_bounded(&mut gateway, Duration::from_secs(20), "the gateway's shutdown");
    assert_eq!(status.code(), Some(0), "{log}");
    // The image's root holds a copy of the binary: not kept once the test has passed.
    std::fs::remove_dir_all(&root).expect("remove the image's root");
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).expect("connect to the gateway");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("read the answer");
    answer
}
