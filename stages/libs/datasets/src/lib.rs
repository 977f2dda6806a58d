//! The dataset formats of the PCB pipeline in one place, pure parsing (files and bytes in,
//! pixel boxes out): DeepPCB, Pascal VOC, YOLO and COCO label files, the class names they
//! use, which files make up one board (image, template, labels), and DeepPCB's list files.
//! The ingester publishes what this crate reads from a watched folder and `pcb train` /
//! `pcb eval` train and score on what it reads from a dataset folder, so a board means the
//! same boxes on both paths.

pub mod classes;
pub mod coco;
pub mod deeppcb;
pub mod error;
pub mod lists;
pub mod pairing;
pub mod text;
pub mod voc;
pub mod yolo;

#[cfg(test)]
mod testing;

pub use classes::ClassMap;
pub use coco::{parse_coco, CocoIndex};
pub use deeppcb::{parse_deeppcb, read_deeppcb};
pub use error::{DatasetError, LabelError, PairError};
pub use lists::{
    list_roots, parse_list, read_list, read_list_file, ListEntry, ListedBoard, SplitLists,
};
pub use pairing::{is_image_name, is_template, pair, template_of, LabelSource, Unit};
pub use pcb_schemas::{BoxLabel, Split, CLASS_NAMES};
pub use text::read_label_file;
pub use voc::parse_voc;
pub use yolo::{image_dimensions, parse_yolo, read_class_list};

/// A box from its `[x1, y1, x2, y2]` corners in pixels and the `(class_id, class)` that a
/// [`ClassMap`] resolved for it.
fn labelled(corners: [f32; 4], (class_id, class): (u16, String)) -> BoxLabel {
    BoxLabel::new(corners, class_id, class)
}
