//! MessagePack codec and the headers every pipeline message carries.

use serde::{de::DeserializeOwned, Serialize};

/// Value of the `Content-Type` header on every pipeline message.
pub const CONTENT_TYPE: &str = "application/msgpack";
/// Header naming the message's schema and version, e.g. `pcb.images.raw/v1`.
pub const SCHEMA_HEADER: &str = "Pcb-Schema";

/// A message type with a schema name and a deduplication id.
pub trait Envelope: Serialize + DeserializeOwned {
    /// Schema name with version, sent in the [`SCHEMA_HEADER`] header.
    const SCHEMA: &'static str;
    /// The `Nats-Msg-Id` used for JetStream deduplication.
    fn msg_id(&self) -> String;

    /// Headers some messages add, so a reader that takes headers only still knows (a label
    /// revision's author, for the viewer's review queue).
    fn extra_headers(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// Header naming who saved a label revision (records with a `revision` only).
pub const REVISION_HEADER: &str = "Pcb-Revision-By";
/// Header with the number of boxes a label revision saved (0: the board is clean).
pub const REVISION_BOXES_HEADER: &str = "Pcb-Revision-Boxes";

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Serialising to MessagePack failed.
    #[error("encoding {schema} as MessagePack: {source}")]
    Encode {
        /// Schema being encoded.
        schema: &'static str,
        /// Underlying error.
        source: rmp_serde::encode::Error,
    },
    /// The payload is not a valid MessagePack map of this schema.
    #[error("decoding {schema} from MessagePack: {source}")]
    Decode {
        /// Schema expected.
        schema: &'static str,
        /// Underlying error.
        source: rmp_serde::decode::Error,
    },
    /// The message says it is another schema.
    #[error("expected schema {expected}, message says {found}")]
    WrongSchema {
        /// Schema expected.
        expected: &'static str,
        /// Schema in the header.
        found: String,
    },
}

/// Encodes a message as a MessagePack map with named fields.
pub fn encode<T: Envelope>(msg: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(msg).map_err(|source| CodecError::Encode {
        schema: T::SCHEMA,
        source,
    })
}

/// Decodes a message, checking the schema header when there is one.
pub fn decode<T: Envelope>(payload: &[u8], schema_header: Option<&str>) -> Result<T, CodecError> {
    if let Some(found) = schema_header {
        if found != T::SCHEMA {
            return Err(CodecError::WrongSchema {
                expected: T::SCHEMA,
                found: found.to_string(),
            });
        }
    }
    rmp_serde::from_slice(payload).map_err(|source| CodecError::Decode {
        schema: T::SCHEMA,
        source,
    })
}

/// The headers a message is published with: `Nats-Msg-Id`, `Content-Type` and the schema,
/// then its [`Envelope::extra_headers`].
pub fn headers_for<T: Envelope>(msg: &T) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("Nats-Msg-Id", msg.msg_id()),
        ("Content-Type", CONTENT_TYPE.to_string()),
        (SCHEMA_HEADER, T::SCHEMA.to_string()),
    ];
    h.extend(msg.extra_headers());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    fn raw() -> RawImage {
        RawImage {
            image_id: image_id(b"img"),
            image: b"img".to_vec(),
            template: Some(b"tpl".to_vec()),
            labels: Some(vec![BoxLabel {
                x1: 1.0,
                y1: 2.0,
                x2: 3.0,
                y2: 4.0,
                class_id: 2,
                class: "short".into(),
            }]),
            label_format: Some("deeppcb".into()),
            board_id: "b".into(),
            line_id: "l".into(),
            source: "a/b_test.jpg".into(),
            captured_at_ms: 5,
            split_hint: Some(Split::Val),
            revision: None,
            image_ref: None,
            template_ref: None,
        }
    }

    #[test]
    fn roundtrip_keeps_every_field() {
        let msg = raw();
        let bytes = encode(&msg).expect("encode");
        let back: RawImage = decode(&bytes, Some(RawImage::SCHEMA)).expect("decode");
        assert_eq!(back, msg);
    }

    #[test]
    fn file_references_roundtrip_and_are_absent_when_unset() {
        let mut msg = raw();
        let plain = encode(&msg).expect("encode");
        let value: rmpv_like::Value = rmp_serde::from_slice(&plain).expect("generic decode");
        assert!(!value.keys().contains(&"image_ref".to_string()));
        msg.image_ref = Some(crate::ObjectRef::of(&msg.image));
        msg.template_ref = Some(crate::ObjectRef::of(b"template"));
        msg.image = Vec::new();
        let bytes = encode(&msg).expect("encode");
        let back: RawImage = decode(&bytes, Some(RawImage::SCHEMA)).expect("decode");
        assert_eq!(back, msg);
        assert!(back.has_template());
    }

    #[test]
    fn file_references_are_read_from_raw_encoded_and_shard_records() {
        let mut msg = raw();
        assert!(FileRefs::decode(&encode(&msg).expect("encode"))
            .expect("refs")
            .is_empty());
        let (img, tpl) = (ObjectRef::of(b"img"), ObjectRef::of(b"tpl"));
        msg.image_ref = Some(img.clone());
        msg.template_ref = Some(tpl.clone());
        let refs = FileRefs::decode(&encode(&msg).expect("encode")).expect("refs");
        assert_eq!(refs, [img.clone(), tpl.clone()]);
        let shard = ShardRecord {
            split: Split::Train,
            shard: 1,
            shard_count: 2,
            routed_at_ms: 3,
            record: EncodedImage {
                image_id: msg.image_id.clone(),
                board_id: "b".into(),
                line_id: "l".into(),
                source: "s".into(),
                captured_at_ms: 1,
                encoded_at_ms: 2,
                image_b64: String::new(),
                width: 1,
                height: 1,
                channels: 3,
                format: "tiff".into(),
                sha256: msg.image_id.clone(),
                labels: None,
                label_format: None,
                template_b64: None,
                split_hint: None,
                revision: None,
                image_ref: Some(img.clone()),
                template_ref: None,
            },
        };
        let refs = FileRefs::decode(&encode(&shard).expect("encode")).expect("refs");
        assert_eq!(refs, std::slice::from_ref(&img));
        let refs = FileRefs::decode(&encode(&shard.record).expect("encode")).expect("refs");
        assert_eq!(refs, [img]);
    }

    #[test]
    fn encoding_is_a_map_with_named_fields() {
        let bytes = encode(&raw()).expect("encode");
        // A generic MessagePack reader (as another language would use) sees field names.
        let value: rmpv_like::Value = rmp_serde::from_slice(&bytes).expect("generic decode");
        let keys = value.keys();
        for k in [
            "image_id",
            "image",
            "template",
            "labels",
            "board_id",
            "split_hint",
        ] {
            assert!(keys.contains(&k.to_string()), "missing key {k}: {keys:?}");
        }
        assert!(matches!(value, rmpv_like::Value::Map(_)));
    }

    #[test]
    fn wrong_schema_header_is_refused() {
        let bytes = encode(&raw()).expect("encode");
        let err = decode::<RawImage>(&bytes, Some("pcb.images.encoded/v1")).unwrap_err();
        assert!(err
            .to_string()
            .contains("expected schema pcb.images.raw/v1"));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            decode::<RawImage>(b"\xc1\xc1", None),
            Err(CodecError::Decode { .. })
        ));
    }

    #[test]
    fn headers_name_id_type_and_schema() {
        let msg = raw();
        let h = headers_for(&msg);
        // A labelled record: its image id and its labels' digest.
        assert_eq!(
            h[0],
            (
                "Nats-Msg-Id",
                crate::record_id(&msg.image_id, msg.labels.as_deref())
            )
        );
        assert!(h[0].1.starts_with(&format!("{}.l", msg.image_id)));
        assert_eq!(h[1], ("Content-Type", "application/msgpack".to_string()));
        assert_eq!(h[2], ("Pcb-Schema", "pcb.images.raw/v1".to_string()));
    }

    /// A schema-less view of MessagePack, standing in for a foreign-language decoder.
    mod rmpv_like {
        use std::collections::BTreeMap;

        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        pub enum Value {
            Map(BTreeMap<String, serde::de::IgnoredAny>),
            Other(serde::de::IgnoredAny),
        }

        impl Value {
            pub fn keys(&self) -> Vec<String> {
                match self {
                    Value::Map(m) => m.keys().cloned().collect(),
                    Value::Other(_) => vec![],
                }
            }
        }
    }
}
