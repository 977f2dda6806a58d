//! One way for every `pcb` subcommand to reach a running pipeline: which server (the
//! `--nats-url` flag, then the URL file `pcb up` wrote, then the pipeline file's
//! `nats.url`), with which credentials and TLS (always the pipeline file's `[nats]`), through
//! `pcb_common::connect`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use pcb_common::{Identity, IdentityStore, NatsConfig};

use crate::pipeline::PipelineFile;

/// The file where `up` records the URL of its server.
pub fn url_file(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("nats.url")
}

/// The identities' folder: the pipeline file's `identities_dir`, else
/// `<data_dir>/identities` (where `pcb up` issues those of its private server).
pub fn identities_dir(pipeline: &PipelineFile, data_dir: &Path) -> PathBuf {
    if pipeline.pipeline.identities_dir.as_os_str().is_empty() {
        data_dir.join("identities")
    } else {
        pipeline.pipeline.identities_dir.clone()
    }
}

/// How a command was told to find the pipeline.
#[derive(Debug, Clone)]
pub struct Where {
    /// `--nats-url`.
    pub nats_url: Option<String>,
    /// `--pipeline`.
    pub pipeline: PathBuf,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

/// A pipeline found: its file and the connection settings to its server.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pipeline file (its defaults when the default file is absent).
    pub pipeline: PipelineFile,
    /// The data dir `pcb up` used.
    pub data_dir: PathBuf,
    /// The pipeline file's `[nats]` with the resolved URL.
    pub nats: NatsConfig,
    /// The identities of the private server `pcb up` started, when the command reaches
    /// that server and the pipeline file names no credentials of its own.
    pub identities: Option<IdentityStore>,
}

/// The pipeline file: loaded and checked when it exists; its defaults when the default
/// path is simply absent (a command run outside the checkout).
pub fn pipeline_file(path: &Path) -> anyhow::Result<PipelineFile> {
    if !path.exists() && path == Path::new(crate::DEFAULT_PIPELINE) {
        return Ok(PipelineFile::default());
    }
    Ok(PipelineFile::load(path)?)
}

/// Resolves the server in the one order every command uses.
pub fn resolve(w: &Where) -> anyhow::Result<Target> {
    let pipeline = pipeline_file(&w.pipeline)?;
    let data_dir = w
        .data_dir
        .clone()
        .unwrap_or_else(|| pipeline.pipeline.data_dir.clone());
    let up_url = std::fs::read_to_string(url_file(&data_dir))
        .map(|u| u.trim().to_string())
        .unwrap_or_default();
    let url = match &w.nats_url {
        Some(u) => u.clone(),
        None => match &up_url {
            u if !u.is_empty() => u.clone(),
            _ if !pipeline.nats.url.is_empty() => pipeline.nats.url.clone(),
            _ => anyhow::bail!(
                "no NATS server known: pass --nats-url, set nats.url in {}, or run `pcb up` first",
                w.pipeline.display()
            ),
        },
    };
    // Named identities serve any server; the private ones only the server `pcb up`
    // started (whose URL it wrote), and only when the file names no credential.
    let named = !pipeline.pipeline.identities_dir.as_os_str().is_empty();
    // Absolute: the path goes into the config files of processes started elsewhere.
    let ids_dir = crate::supervisor::absolute(&identities_dir(&pipeline, &data_dir));
    let private = url == up_url && !pipeline.nats.has_credentials() && ids_dir.is_dir();
    let identities = if named || private {
        Some(IdentityStore::ensure(&ids_dir)?)
    } else {
        None
    };
    let nats = NatsConfig {
        url,
        ..pipeline.nats.clone()
    };
    Ok(Target {
        pipeline,
        data_dir,
        nats,
        identities,
    })
}

impl Target {
    /// The connection settings of `id`: its own identity on the private server of `pcb
    /// up`, else the pipeline file's credentials and TLS.
    pub fn nats_as(&self, id: Identity) -> NatsConfig {
        IdentityStore::connection_of(self.identities.as_ref(), id, &self.nats)
    }

    /// Connects as `name` with the admin identity (or the pipeline file's credentials).
    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        self.connect_as(Identity::Admin, name).await
    }

    /// Connects as `name` with identity `id` (or the pipeline file's credentials).
    pub async fn connect_as(&self, id: Identity, name: &str) -> anyhow::Result<async_nats::Client> {
        pcb_common::nats::connect_now(&self.nats_as(id), name)
            .await
            .with_context(|| format!("connecting to {} (is the pipeline up?)", self.nats.url))
    }
}

/// `pcb init`: creates (or brings to the pipeline file's settings) every stream, bucket
/// and durable consumer; running it again changes nothing. Prints what it did.
pub async fn init(w: &Where) -> anyhow::Result<()> {
    let target = resolve(w)?;
    let client = target.connect("pcb-init").await?;
    let js = async_nats::jetstream::new(client);
    let made =
        pcb_common::provision(&js, &target.pipeline.streams, &target.pipeline.consumers()).await?;
    println!("NATS {}", target.nats.url);
    for (what, rows) in [
        (
            "stream",
            made.streams
                .iter()
                .map(|(n, p)| (n.to_string(), *p))
                .collect::<Vec<_>>(),
        ),
        (
            "bucket",
            made.buckets
                .iter()
                .map(|(n, p)| (n.to_string(), *p))
                .collect(),
        ),
        ("consumer", made.consumers.clone()),
    ] {
        for (name, p) in rows {
            println!("{what:<9} {name:<28} {}", format!("{p:?}").to_lowercase());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline_with_url(dir: &Path, url: &str) -> PathBuf {
        let p = dir.join("p.toml");
        std::fs::write(
            &p,
            format!("[pipeline]\ndata_dir = {:?}\n[nats]\nurl = {url:?}\nuser = \"u\"\npassword = \"pw\"\n", dir.join("data").display().to_string()),
        )
        .expect("write");
        p
    }

    #[test]
    fn the_flag_wins_then_the_url_file_then_the_pipeline_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pipeline = pipeline_with_url(dir.path(), "nats://file:1");
        let mut w = Where {
            nats_url: None,
            pipeline,
            data_dir: None,
        };
        let t = resolve(&w).expect("resolves");
        assert_eq!(t.nats.url, "nats://file:1");
        assert_eq!(t.nats.user.as_deref(), Some("u"), "credentials come along");
        let run = dir.path().join("data").join("run");
        std::fs::create_dir_all(&run).expect("mkdir");
        std::fs::write(run.join("nats.url"), "nats://up:2\n").expect("write");
        assert_eq!(resolve(&w).expect("resolves").nats.url, "nats://up:2");
        w.nats_url = Some("nats://flag:3".into());
        let t = resolve(&w).expect("resolves");
        assert_eq!(t.nats.url, "nats://flag:3");
        assert_eq!(t.nats.password.as_deref(), Some("pw"));
    }

    #[test]
    fn identities_serve_the_private_server_or_the_named_folder_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let p = dir.path().join("p.toml");
        let write = |extra: &str| {
            std::fs::write(
                &p,
                format!(
                    "[pipeline]\ndata_dir = {:?}\n{extra}[nats]\nurl = \"nats://file:1\"\n",
                    data.display().to_string()
                ),
            )
            .expect("write");
        };
        write("");
        let mut w = Where {
            nats_url: None,
            pipeline: p.clone(),
            data_dir: None,
        };
        // No `pcb up` here: the pipeline file's server, its (absent) credentials.
        assert!(resolve(&w).expect("resolves").identities.is_none());
        // `pcb up` wrote its URL and issued identities: they serve that server only.
        let run = data.join("run");
        std::fs::create_dir_all(&run).expect("mkdir");
        std::fs::write(run.join("nats.url"), "nats://up:2\n").expect("write");
        IdentityStore::ensure(&data.join("identities")).expect("issue");
        let t = resolve(&w).expect("resolves");
        let status = t.nats_as(Identity::Reader);
        assert!(status
            .nkey_seed_file
            .expect("seed")
            .ends_with("identities/reader.nk"));
        assert_eq!(status.inbox_prefix.as_deref(), Some("_INBOX_reader"));
        w.nats_url = Some("nats://elsewhere:3".into());
        assert!(resolve(&w).expect("resolves").identities.is_none());
        // A folder named in the pipeline file serves any server.
        let named = dir.path().join("named");
        IdentityStore::ensure(&named).expect("issue");
        write(&format!(
            "identities_dir = {:?}\n",
            named.display().to_string()
        ));
        let t = resolve(&w).expect("resolves");
        assert_eq!(
            t.nats_as(Identity::Admin).nkey_seed_file,
            Some(named.join("admin.nk"))
        );
    }

    #[test]
    fn no_server_known_says_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pipeline = pipeline_with_url(dir.path(), "");
        let w = Where {
            nats_url: None,
            pipeline,
            data_dir: None,
        };
        let e = resolve(&w).unwrap_err().to_string();
        assert!(e.contains("--nats-url") && e.contains("pcb up"), "{e}");
    }
}
