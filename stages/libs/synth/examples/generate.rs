//! Writes a synthetic DeepPCB-style dataset and prints the summary and elapsed time.
//!
//! Usage: `cargo run --release -p pcb-synth --example generate -- <out_dir> [count] [seed] [size]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use pcb_synth::{generate, SynthOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        eprintln!("usage: generate <out_dir> [count] [seed] [size]");
        return ExitCode::FAILURE;
    };
    let defaults = SynthOptions::default();
    let parse = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let opts = SynthOptions {
        count: parse(1).map_or(defaults.count, |v| v as usize),
        seed: parse(2).unwrap_or(defaults.seed),
        size: parse(3).map_or(defaults.size, |v| v as u32),
        ..defaults
    };
    let start = Instant::now();
    // Report roughly every tenth of the run so long runs show signs of life.
    let step = (opts.count / 10).max(1);
    let mut progress = |done: usize, total: usize| {
        if done % step == 0 || done == total {
            eprintln!("{done}/{total}");
        }
    };
    match generate(&opts, &out, &mut progress) {
        Ok(s) => {
            println!(
                "{} boards ({} train, {} val), {} defects, per class {:?}, {:.2}s",
                s.boards,
                s.train,
                s.val,
                s.defects,
                s.per_class,
                start.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
