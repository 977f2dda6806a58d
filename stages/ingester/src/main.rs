//! `ingester` binary: watches a directory (or imports one with `--once`) into
//! `pcb.images.raw`, under the shared stage main.
fn main() -> std::process::ExitCode {
    pcb_common::stage::main::<pcb_ingester::IngesterStage>()
}
