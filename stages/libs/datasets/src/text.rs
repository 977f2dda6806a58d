//! Label and list files as text: how every format's file is read (UTF-8, byte-order mark
//! dropped) and the small helpers all the parsers share for numbers and error positions, so
//! that a quirk of the bytes is handled once for every format.

use std::path::Path;

use crate::error::LabelError;

/// Reads a label file as text, naming the file in the error; a UTF-8 byte-order mark is
/// dropped because Windows tools write one and it would otherwise corrupt the first field.
pub fn read_label_file(path: &Path) -> Result<String, LabelError> {
    let bytes = std::fs::read(path).map_err(|source| LabelError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(strip_bom(&text).to_string()),
        Err(e) => Err(LabelError::Syntax {
            path: path.to_path_buf(),
            line: Some(line_at(e.as_bytes(), e.utf8_error().valid_up_to())),
            message: "not UTF-8 text".to_string(),
        }),
    }
}

/// `text` without a leading UTF-8 byte-order mark.
pub(crate) fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// 1-based line number of byte `offset` in `bytes`.
pub(crate) fn line_at(bytes: &[u8], offset: usize) -> usize {
    let end = offset.min(bytes.len());
    bytes[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// A [`LabelError::Syntax`] about `path`.
pub(crate) fn syntax(path: &Path, line: Option<usize>, message: impl Into<String>) -> LabelError {
    LabelError::Syntax {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// The lines of `text` that hold anything, numbered from 1 and split into fields at every
/// run of `separator` characters; a leading byte-order mark is dropped.
pub(crate) fn field_lines(
    text: &str,
    separator: fn(char) -> bool,
) -> impl Iterator<Item = (usize, Vec<&str>)> {
    strip_bom(text)
        .lines()
        .enumerate()
        .filter_map(move |(index, raw)| {
            let fields: Vec<&str> = raw.split(separator).filter(|f| !f.is_empty()).collect();
            (!fields.is_empty()).then_some((index + 1, fields))
        })
}

/// The error for a line of `found` fields where the format wants the five of `shape`.
pub(crate) fn five_numbers(path: &Path, line: usize, shape: &str, found: usize) -> LabelError {
    syntax(
        path,
        Some(line),
        format!("expected 5 numbers \"{shape}\", found {found}"),
    )
}

/// A finite number; NaN and infinities parse as `f32` but would poison every later check.
pub(crate) fn parse_number(
    field: &str,
    what: &str,
    path: &Path,
    line: usize,
) -> Result<f32, LabelError> {
    match field.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(syntax(
            path,
            Some(line),
            format!("{what} \"{field}\" is not a number"),
        )),
    }
}

/// `field` as an integer of type `T`, or an error naming it `what` and saying what it must be
/// (`expected`, e.g. "a class id (an integer 0..=65535)").
pub(crate) fn parse_integer<T: std::str::FromStr>(
    field: &str,
    what: &str,
    expected: &str,
    path: &Path,
    line: usize,
) -> Result<T, LabelError> {
    field.parse().map_err(|_| {
        syntax(
            path,
            Some(line),
            format!("{what} \"{field}\" is not {expected}"),
        )
    })
}

/// The four numbers of `fields`, each named by `names` in an error.
pub(crate) fn parse_four(
    fields: &[&str],
    names: [&str; 4],
    path: &Path,
    line: usize,
) -> Result<[f32; 4], LabelError> {
    let mut values = [0f32; 4];
    for (slot, (field, what)) in values.iter_mut().zip(fields.iter().zip(names)) {
        *slot = parse_number(field, what, path, line)?;
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_syntax_at;

    #[test]
    fn read_label_file_reports_missing_file_and_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.txt");
        let err = read_label_file(&missing).unwrap_err();
        assert!(matches!(err, LabelError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("none.txt"), "{err}");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, b"1 2 3 4 1\n\xff\xfe\n").unwrap();
        let err = read_label_file(&bad).unwrap_err();
        assert_syntax_at(&err, 2);
        let good = dir.path().join("good.txt");
        std::fs::write(&good, "\u{feff}1 2 3 4 1\n").unwrap();
        assert_eq!(read_label_file(&good).unwrap(), "1 2 3 4 1\n");
    }
}
