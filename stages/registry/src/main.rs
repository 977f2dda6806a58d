//! `registry` binary: the registry writer stage under the shared stage main.
fn main() -> std::process::ExitCode {
    pcb_common::stage::main::<pcb_registry::RegistryStage>()
}
