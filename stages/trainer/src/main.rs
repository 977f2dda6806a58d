//! `trainer` binary: one rank of a training job, under the shared stage main.
fn main() -> std::process::ExitCode {
    pcb_common::stage::main::<pcb_trainer::Trainer>()
}
