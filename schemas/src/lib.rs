//! The single home of the pipeline's wire contract: message types, subject names, stream
//! names and the MessagePack codec every stage (and any non-Rust client) relies on.

pub mod codec;
pub mod messages;
pub mod subjects;
pub mod topology;

pub use codec::{
    decode, encode, headers_for, CodecError, Envelope, CONTENT_TYPE, REVISION_BOXES_HEADER,
    REVISION_HEADER, SCHEMA_HEADER,
};
pub use messages::*;
pub use subjects::*;
pub use topology::{Durable, ProcessKind, ReadMode, StageDecl, StageName, STAGES};
