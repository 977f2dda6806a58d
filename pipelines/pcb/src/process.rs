//! Child process helpers: children tied to `pcb` (they die with it, even when it is
//! SIGKILLed), polite termination with a deadline, a clean environment for stages.

use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` so that the child gets SIGTERM when `pcb` ends, however it ends (Linux's
/// `PR_SET_PDEATHSIG`). The signal follows the *thread* that forked, so every tied child
/// is forked by one thread that lives as long as the process, never by a tokio or
/// blocking-pool thread that may retire.
pub fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let parent = std::process::id();
        let started = std::thread::Builder::new()
            .name("pcb-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_deathsig(&mut cmd, parent));
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no spawner thread; children are not tied to pcb");
        }
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    let sent = spawner
        .lock()
        .map_err(|_| std::io::Error::other("the spawner lock is poisoned"))?
        .send((cmd, reply));
    match sent {
        Ok(()) => answer
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread stopped"))?,
        // No spawner thread: spawn untied rather than not at all.
        Err(mpsc::SendError((mut cmd, _))) => cmd.spawn(),
    }
}

#[cfg(target_os = "linux")]
fn spawn_with_deathsig(cmd: &mut Command, parent: u32) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, _exit.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // pcb may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(not(target_os = "linux"))]
fn spawn_with_deathsig(cmd: &mut Command, _parent: u32) -> std::io::Result<Child> {
    cmd.spawn()
}

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
