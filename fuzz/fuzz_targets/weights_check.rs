//! The part of the registry's weight check (`check_weights` in stages/registry/src/lib.rs)
//! that runs without libtorch: parsing a candidate's weights as safetensors and reading
//! every tensor's name and shape. A candidate's weights come from the candidates' object
//! store, which any trainer (or anyone allowed to publish there) fills: a broken file must be
//! refused as `artifact-format`, not crash the registry.
//!
//! The rest of `check_weights` builds the declared network with pcb-vision, i.e. libtorch
//! (`cargo tree -p pcb-registry -i tch`), and the registry crate links tch itself, so it
//! cannot be linked here. No project code parses the header without tch either: the
//! registry calls the `safetensors` crate directly. So this target repeats those calls
//! (`SafeTensors::deserialize`, then `tensors()` and each view's `shape()`) on the same
//! release of the crate (pinned by Cargo.lock, as in the main workspace), and checks what the
//! registry relies on: every tensor a parse accepts lies within the file, its byte length
//! is its shape's element count times its dtype's size, and the header's metadata reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;

fuzz_target!(|data: &[u8]| {
    // As check_weights does; its error becomes the `artifact-format` refusal's text.
    let tensors = match SafeTensors::deserialize(data) {
        Ok(t) => t,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let mut names = std::collections::BTreeSet::new();
    for (name, view) in tensors.tensors() {
        // check_weights turns every dimension into i64 for the comparison.
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let elements = view
            .shape()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .expect("an accepted shape's element count fits usize");
        assert_eq!(
            view.data().len(),
            elements * view.dtype().size(),
            "{name}: {shape:?} of {:?}",
            view.dtype()
        );
        assert!(view.data().len() <= data.len());
        assert!(names.insert(name), "a tensor name twice");
    }
    assert_eq!(names.len(), tensors.len());
    let _ = SafeTensors::read_metadata(data).expect("a parsed file's metadata reads");
});
