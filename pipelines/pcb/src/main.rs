//! `pcb`: start, inspect and benchmark the PCB pipeline.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pcb::demo::DemoOptions;
use pcb::supervisor::UpOptions;

/// The PCB defect-detection pipeline on NATS JetStream.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Pipeline file.
    #[arg(long, default_value = pcb::DEFAULT_PIPELINE, env = "PCB_PIPELINE")]
    pipeline: PathBuf,
    /// Use this NATS server instead of starting a private one.
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,
    /// Watched folder (default: <data_dir>/inbox).
    #[arg(long, value_name = "DIR")]
    watch: Option<PathBuf>,
    /// Data dir (default: the pipeline file's, .pcb-data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the web viewer (default: the pipeline file's, 127.0.0.1:8080; port 0
    /// picks a free one). Beyond loopback the viewer needs a token in the pipeline file.
    #[arg(long, value_name = "ADDR")]
    viewer_addr: Option<String>,
    /// Do not register the shipped default model when the registry has no version of the
    /// detector's model (the detector then waits for a trained one).
    #[arg(long)]
    no_default_model: bool,
    /// Run the private server as a cluster of N nodes on this machine (3 or 5), every
    /// stream and bucket replicated on each (default: the pipeline file's
    /// nats_server.cluster_nodes, 1).
    #[arg(long, value_name = "N")]
    cluster: Option<usize>,
}

impl Common {
    fn up(&self) -> UpOptions {
        UpOptions {
            pipeline: self.pipeline.clone(),
            nats_url: self.nats_url.clone(),
            watch: self.watch.clone(),
            data_dir: self.data_dir.clone(),
            viewer_addr: self.viewer_addr.clone(),
            default_model: !self.no_default_model,
            cluster: self.cluster,
        }
    }
}

/// Where a running pipeline is: every command that talks to one finds it the same way.
#[derive(clap::Args, Clone)]
struct Reach {
    /// Server (default: the one `pcb up` started, then the pipeline file's `nats.url`);
    /// credentials and TLS always come from the pipeline file's `[nats]`.
    #[arg(long, value_name = "URL", global = true)]
    nats_url: Option<String>,
    /// Pipeline file.
    #[arg(
        long,
        default_value = pcb::DEFAULT_PIPELINE,
        env = "PCB_PIPELINE",
        global = true
    )]
    pipeline: PathBuf,
    /// Data dir of `pcb up`.
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
}

impl Reach {
    fn to_where(&self) -> pcb::reach::Where {
        pcb::reach::Where {
            nats_url: self.nats_url.clone(),
            pipeline: self.pipeline.clone(),
            data_dir: self.data_dir.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the pipeline's streams, buckets and durable consumers on a server (what
    /// `pcb up` does first); idempotent. Stages never create them themselves.
    Init(Reach),
    /// Print the topology tables (subjects; stages with their consumers and buckets;
    /// identities with what they may publish and read) the README carries, derived from
    /// schemas/src/topology.rs.
    Topology,
    /// Issue the pipeline's NATS identities for a server of your own: an nkey seed per
    /// identity (`<identity>.nk`, mode 0600; existing ones are kept) and `pcb-users.conf`
    /// (their public keys and permissions, derived from the topology, plus a system-account
    /// user), which deploy/nats/nats-server.conf includes.
    Identities {
        /// Folder of the seeds and pcb-users.conf (created with mode 0700).
        #[arg(long)]
        out: PathBuf,
    },
    /// Start the pipeline (private nats-server unless --nats-url) until Ctrl-C.
    Up(Common),
    /// `up`, drop the synthetic sample into the watched folder, print what flowed where.
    Demo {
        #[command(flatten)]
        common: Common,
        /// Synthetic boards to drop.
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Generator seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        /// Keep the pipeline running after the summary (Ctrl-C stops it).
        #[arg(long)]
        keep_running: bool,
        /// Epochs of the small model trained on the sample before detecting (0: none).
        #[arg(long, default_value_t = 1)]
        train_epochs: usize,
        /// DeepPCB dataset folder: eight of its val boards (pipelines/demo/deeppcb-sample.txt)
        /// join the synthetic ones when it is there.
        #[arg(long, default_value = "../shared/datasets/deeppcb")]
        deeppcb: std::path::PathBuf,
    },
    /// Message counts per stream and subject, pending counts per consumer.
    Status(Reach),
    /// Generate synthetic PCB boards in DeepPCB's layout.
    Synth {
        /// Boards to generate.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Seed: the same seed gives the same files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Share of boards listed in test.txt.
        #[arg(long, default_value_t = 0.2)]
        val_fraction: f64,
    },
    /// Train the detector: a job of `--ranks` trainer processes over the shard streams,
    /// or, with `--data DIR`, in this process on a DeepPCB-layout folder.
    Train(Box<pcb::vision_cli::TrainArgs>),
    /// Evaluate weights under the DeepPCB protocol: table, JSON report, PR curves.
    Eval(Box<pcb::vision_cli::EvalArgs>),
    /// The model registry: list, show, promote, rollback, import, export.
    Models {
        #[command(flatten)]
        reach: Reach,
        #[command(subcommand)]
        cmd: pcb::models_cli::ModelsCmd,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Our Faster R-CNN beside torchvision and ONNX Runtime: s/image, infer and train.
    Vision(pcb::bench_vision::VisionBenchArgs),
    /// The bare model beside the online detector through JetStream, and latency from a
    /// file landing to its detection.
    Detector(pcb::bench_detector::DetectorBenchArgs),
    /// Data-parallel training: 1 rank x 1 thread, 1 x N, N ranks x 1, the all-reduce per
    /// step and the scaling efficiency, beside torchvision with torch.distributed (Gloo).
    Trainer(pcb::bench_trainer::TrainerBenchArgs),
    /// The viewer's page and API load times with a large detections stream (100,000).
    Viewer(pcb::bench_viewer::ViewerBenchArgs),
    /// Bare decode vs ingester → encoder → router over JetStream, side by side.
    Pipeline {
        /// Boards.
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Benchmark the boards of this folder (DeepPCB, VOC, YOLO or COCO layout, such
        /// as ../shared/datasets/deeppcb) instead of generating `--count` synthetic ones.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before any model runs: every subcommand that runs one (train, eval, bench, demo) keeps
    // freed tensor memory for its next pass (pcb_vision::heap).
    let heap = pcb_vision::heap::keep_freed_buffers();
    tracing::debug!(%heap, "allocator");
    pcb_common::init_tracing(&pcb_common::LogConfig {
        filter: "warn".into(),
        ..Default::default()
    });
    match cli.command {
        Cmd::Up(c) => pcb::up::up(c.up(), &pcb_common::Shutdown::on_signals()).await,
        Cmd::Demo {
            common,
            count,
            seed,
            timeout_secs,
            keep_running,
            train_epochs,
            deeppcb,
        } => {
            pcb::demo::demo(
                common.up(),
                DemoOptions {
                    count,
                    seed,
                    timeout: Duration::from_secs(timeout_secs),
                    keep_running,
                    train_epochs,
                    deeppcb,
                },
                &pcb_common::Shutdown::on_signals(),
            )
            .await
        }
        Cmd::Init(reach) => pcb::reach::init(&reach.to_where()).await,
        Cmd::Topology => {
            println!("{}", pcb_schemas::topology::subjects_markdown());
            println!("{}", pcb_schemas::topology::stages_markdown());
            print!("{}", pcb_common::identity::identities_markdown());
            Ok(())
        }
        Cmd::Identities { out } => {
            let ids = pcb_common::IdentityStore::ensure(&out)?;
            let conf = out.join("pcb-users.conf");
            // Public keys and the MQTT user's bcrypt hash: its owner's to read.
            pcb_common::identity::write_secret(&conf, ids.server_conf()?.as_bytes())?;
            println!("{}", conf.display());
            for id in pcb_common::Identity::all() {
                let key = if id.uses_nkey() {
                    ids.public_key(id)
                } else {
                    "(MQTT password; the config holds its bcrypt hash)"
                };
                println!("{:<9} {key}  {}", id.name(), ids.secret_file(id).display());
            }
            Ok(())
        }
        Cmd::Status(reach) => status(&reach.to_where()).await,
        Cmd::Models { reach, cmd } => pcb::models_cli::run(&reach.to_where(), cmd).await,
        Cmd::Synth {
            count,
            out,
            seed,
            val_fraction,
        } => {
            let bar = indicatif::ProgressBar::new(count as u64);
            let started = std::time::Instant::now();
            let opts = pcb_synth::SynthOptions {
                count,
                seed,
                val_fraction,
                ..Default::default()
            };
            let summary =
                pcb_synth::generate(&opts, &out, &mut |done, _| bar.set_position(done as u64))?;
            bar.finish_and_clear();
            println!(
                "wrote {} boards ({} defects; {} train, {} val) to {} in {:.1}s",
                summary.boards,
                summary.defects,
                summary.train,
                summary.val,
                out.display(),
                started.elapsed().as_secs_f64()
            );
            for (i, n) in summary.per_class.iter().enumerate() {
                println!("  {:<10} {n}", pcb_schemas::CLASS_NAMES[i]);
            }
            Ok(())
        }
        Cmd::Train(args) => match &args.data {
            Some(dir) => pcb::vision_cli::train(&args, dir),
            None if args.negatives.is_some() => Err(anyhow::anyhow!(
                "--negatives is for folder runs (--data DIR); over the streams the boards carry their own labels"
            )),
            None => pcb::train_job::run(args.job_options(), &pcb_common::Shutdown::on_signals())
                .await
                .map(|_| ()),
        },
        Cmd::Eval(args) => pcb::vision_cli::eval(&args),
        Cmd::Bench { what } => match what {
            BenchCmd::Vision(args) => pcb::bench_vision::run(&args),
            BenchCmd::Detector(args) => pcb::bench_detector::run(&args).await,
            BenchCmd::Trainer(args) => pcb::bench_trainer::run(&args),
            BenchCmd::Viewer(args) => pcb::bench_viewer::run(&args).await,
            BenchCmd::Pipeline { count, seed, dir } => {
                let rows = pcb::bench::pipeline(count, seed, dir.as_deref()).await?;
                print!("{}", pcb::bench::render(&rows));
                Ok(())
            }
        },
    }
}

async fn status(w: &pcb::reach::Where) -> anyhow::Result<()> {
    let target = pcb::reach::resolve(w)?;
    // Counting is reading: the read-only identity on the private server of `pcb up`.
    let client = target
        .connect_as(pcb_common::Identity::Reader, "pcb-status")
        .await?;
    let js = async_nats::jetstream::new(client);
    let streams = pcb::status::collect(&js).await?;
    println!("NATS {}\n", target.nats.url);
    print!("{}", pcb::status::render(&streams));
    Ok(())
}
