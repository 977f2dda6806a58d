//! Child process helpers: polite termination with a deadline.

use std::process::Child;
use std::time::{Duration, Instant};

/// Sends SIGTERM, waits up to `grace`, then kills.
pub fn terminate(child: &mut Child, grace: Duration) {
    send_signal(child, libc_sigterm());
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` to the child (no-op when it already exited).
pub fn send_signal(child: &Child, signal: i32) {
    // `kill` is in every POSIX base system; no libc crate needed for one call.
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .stderr(std::process::Stdio::null())
        .status();
}

/// SIGTERM.
pub const fn libc_sigterm() -> i32 {
    15
}

/// Drops `PCB_*` variables from a stage's environment: `pcb` already applied them to the
/// pipeline file it wrote the stage's config from, and a stage would read the pipeline
/// file's keys (`PCB_STAGES__...`) as unknown keys of its own config.
pub fn scrub_pcb_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for (key, _) in std::env::vars_os() {
        // PCB_NCCL_SHIM names a library, not a setting: the trainer ranks need it.
        let key_text = key.to_string_lossy();
        if key_text.starts_with("PCB_") && key_text != "PCB_NCCL_SHIM" {
            cmd.env_remove(key);
        }
    }
    cmd
}
