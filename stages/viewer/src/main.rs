//! `viewer` binary: the web viewer stage under the shared stage main.
fn main() -> std::process::ExitCode {
    pcb_common::stage::main::<pcb_viewer::Viewer>()
}
