//! Class names and ids: which id a name in a label file stands for (whatever spelling another
//! PCB dataset uses) and which name an id has, so that every format and every stage maps
//! classes the same way.

use pcb_schemas::CLASS_NAMES;

/// Class names in id order: id `i` (1-based) names `names[i - 1]`; 0 stays background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassMap {
    names: Vec<String>,
    /// `names` folded by [`fold`], so lookups need not re-fold the map every time.
    folded: Vec<String>,
}

/// Spellings other datasets (PKU-Market-PCB, Roboflow exports) use for DeepPCB's classes,
/// already folded; each maps to the folded canonical name it stands for.
const ALIASES: [(&str, &str); 4] = [
    ("spuriouscopper", "copper"),
    ("opencircuit", "open"),
    ("shortcircuit", "short"),
    ("mousebites", "mousebite"),
];

/// Folds case and the separators people vary (`pin_hole`, `Pin-Hole`, `pin hole`, `pinhole`)
/// so that they all compare equal.
fn fold(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '_' | '-' | ' ' | '\t'))
        .flat_map(char::to_lowercase)
        .collect()
}

impl ClassMap {
    /// A map whose class id `i` is `names[i - 1]`.
    pub fn new(names: Vec<String>) -> ClassMap {
        let folded = names.iter().map(|n| fold(n)).collect();
        ClassMap { names, folded }
    }

    /// The id of `name`, ignoring case and `_`/`-`/space, and accepting the aliases other
    /// PCB datasets use (`spurious_copper` → `copper`, `mouse_bite` → `mousebite`, ...).
    pub fn id_of(&self, name: &str) -> Option<u16> {
        let wanted = fold(name.trim());
        if wanted.is_empty() {
            return None;
        }
        let index = self.folded.iter().position(|f| *f == wanted).or_else(|| {
            let canonical = ALIASES.iter().find(|(alias, _)| *alias == wanted)?.1;
            self.folded.iter().position(|f| f == canonical)
        })?;
        u16::try_from(index + 1).ok()
    }

    /// The name of class `id`; `None` for 0 (background) and ids past the end.
    pub fn name_of(&self, id: u16) -> Option<&str> {
        let index = usize::from(id).checked_sub(1)?;
        self.names.get(index).map(String::as_str)
    }

    /// Number of classes (the largest valid id).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the map has no class at all.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Class id and stored name for a name a label source gave: the canonical name when it is
    /// known, else id 0 with the name as given, so that the encoder can say which was unknown.
    pub(crate) fn resolve_name(&self, name: &str) -> (u16, String) {
        match self.id_of(name) {
            Some(id) => (id, self.name_of(id).unwrap_or(name).to_string()),
            None => (0, name.trim().to_string()),
        }
    }

    /// Class id and stored name for a numeric id: out-of-map ids are kept (with no name) so the
    /// encoder can reject them as unknown rather than the box silently changing class.
    pub(crate) fn resolve_id(&self, id: u16) -> (u16, String) {
        (id, self.name_of(id).unwrap_or_default().to_string())
    }
}

impl Default for ClassMap {
    /// DeepPCB's six classes, in the pipeline's [`CLASS_NAMES`] order.
    fn default() -> ClassMap {
        ClassMap::new(CLASS_NAMES.iter().map(|n| n.to_string()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_map_default_is_deeppcb_order() {
        let map = ClassMap::default();
        assert_eq!(map.len(), 6);
        assert!(!map.is_empty());
        assert_eq!(map.id_of("open"), Some(1));
        assert_eq!(map.id_of("pin-hole"), Some(6));
        assert_eq!(map.name_of(3), Some("mousebite"));
        assert_eq!(map.name_of(0), None);
        assert_eq!(map.name_of(7), None);
    }

    #[test]
    fn class_map_accepts_case_separator_variants_and_aliases() {
        let map = ClassMap::default();
        for name in ["pin_hole", "pinhole", "Pin Hole", "PIN-HOLE"] {
            assert_eq!(map.id_of(name), Some(6), "{name}");
        }
        for name in [
            "spurious_copper",
            "spurious copper",
            "Spurious-Copper",
            "COPPER",
        ] {
            assert_eq!(map.id_of(name), Some(5), "{name}");
        }
        assert_eq!(map.id_of("mouse_bite"), Some(3));
        assert_eq!(map.id_of("open_circuit"), Some(1));
        assert_eq!(map.id_of("Short"), Some(2));
        assert_eq!(map.id_of("missing_hole"), None);
        assert_eq!(map.id_of(""), None);
        // "spur" must not swallow "spurious copper" or vice versa.
        assert_eq!(map.id_of("spur"), Some(4));
    }

    #[test]
    fn class_map_aliases_only_apply_when_their_target_exists() {
        let map = ClassMap::new(vec!["scratch".into(), "copper".into()]);
        assert_eq!(map.id_of("spurious_copper"), Some(2));
        assert_eq!(map.id_of("mouse_bite"), None);
        assert_eq!(map.id_of("SCRATCH"), Some(1));
    }
}
