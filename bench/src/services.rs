//! The `leadflow` services under test, each a separate process (`leadflow run <service>`), so CPU and memory are
//! read per service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The environment every service process runs with, and where their logs go.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub exe: PathBuf,
    pub env: BTreeMap<String, String>,
    pub log_dir: PathBuf,
}

/// A running service process, killed when dropped.
pub struct ServiceProcess {
    pub name: String,
    pub pid: u32,
    child: Child,
    log: PathBuf,
}

impl Launcher {
    /// Runs `leadflow <args>` to completion (migrate, apply), failing with its output when it fails.
    pub async fn run_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            anyhow::bail!(
                "leadflow {} failed ({}): {}",
                args.join(" "),
                output.status,
                text.trim()
            );
        }
        Ok(text)
    }

    /// Starts `leadflow run <service>` with `http_addr` as its HTTP listener; output goes to `<log_dir>/<service>.log`.
    pub fn spawn(&self, service: &str, http_addr: &str) -> anyhow::Result<ServiceProcess> {
        let log = self.log_dir.join(format!("{service}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = file.try_clone()?;
        let mut command = self.command(&["run", service]);
        command
            .env("LEADFLOW_HTTP_ADDR", http_addr)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} run {service}", self.exe.display()))?;
        let pid = child.id().context("the service exited at once")?;
        Ok(ServiceProcess {
            name: service.to_string(),
            pid,
            child,
            log,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.exe);
        command.args(args).stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("LEADFLOW_") {
                command.env_remove(key);
            }
        }
        command.envs(&self.env);
        command
    }
}

impl ServiceProcess {
    /// Fails with the tail of its log when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            anyhow::bail!(
                "the {} process exited ({status}); the end of its log:\n{}",
                self.name,
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGTERM (graceful: in-flight work is drained and acknowledged), then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                if !status.success() {
                    eprintln!(
                        "bench: the {} process stopped with {status}; the end of its log:\n{}",
                        self.name,
                        log_tail(&self.log, 10)
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.child.kill().await.context("cannot kill a service process")?;
                anyhow::bail!("the {} process did not stop within {grace:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on the loopback interface (bound, then released for the child to take).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a local port")?;
    Ok(listener.local_addr()?.port())
}
