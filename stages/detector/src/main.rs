//! `detector` binary: the online detector stage under the shared stage main.
fn main() -> std::process::ExitCode {
    pcb_common::stage::main::<pcb_detector::DetectorStage>()
}
