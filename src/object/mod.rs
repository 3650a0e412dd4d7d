//! ELF objects: which functions they hold, which maps they define, and the
//! byte layout of each map's key and value (from BTF when present).
//!
//! Pure over bytes; reading files is the caller's business.

pub mod btf;

use std::collections::BTreeMap;

use aya_obj::{Object, ProgramSection};
use object::{Object as _, ObjectSection as _};
use sha2::{Digest, Sha256};

use crate::codec::Layout;
use crate::spec::ProgramType;

/// What bpfsync needs to know about one ELF object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// sha256 of the object's bytes, hex.
    pub digest: String,
    /// Function name → program type (None for types bpfsync cannot attach).
    pub functions: BTreeMap<String, Option<ProgramType>>,
    pub maps: BTreeMap<String, MapDef>,
}

/// A map as the object defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub key: Layout,
    pub value: Layout,
}

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;

impl MapDef {
    /// Maps whose entries the spec can declare: plain key/value stores.
    pub fn is_manageable(&self) -> bool {
        matches!(self.map_type, BPF_MAP_TYPE_HASH | BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_LRU_HASH | BPF_MAP_TYPE_LPM_TRIE)
    }

    /// Array maps hold every key; "absent" means all-zero value.
    pub fn is_array(&self) -> bool {
        matches!(self.map_type, BPF_MAP_TYPE_ARRAY | BPF_MAP_TYPE_PERCPU_ARRAY)
    }

    pub fn type_name(&self) -> &'static str {
        map_type_name(self.map_type)
    }
}

pub fn map_type_name(t: u32) -> &'static str {
    match t {
        BPF_MAP_TYPE_HASH => "hash",
        BPF_MAP_TYPE_ARRAY => "array",
        BPF_MAP_TYPE_PERCPU_HASH => "percpu_hash",
        BPF_MAP_TYPE_PERCPU_ARRAY => "percpu_array",
        BPF_MAP_TYPE_LRU_HASH => "lru_hash",
        BPF_MAP_TYPE_LPM_TRIE => "lpm_trie",
        27 => "ringbuf",
        _ => "other",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("not a valid eBPF ELF object: {reason}")]
    Parse { reason: String },
}

pub fn digest(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The layout of `struct name` in the object's BTF: what the C compiler
/// made of a struct the object uses (checked against the Rust mirrors in
/// `tests/datapath_layouts.rs`).
pub fn struct_layout(bytes: &[u8], name: &str) -> Option<Layout> {
    let elf = object::File::parse(bytes).ok()?;
    let btf = btf::Btf::parse(elf.section_by_name(".BTF")?.data().ok()?)?;
    btf.struct_layout(name)
}

/// Section names the ELF parser of aya 0.14 (aya-obj 0.3) does not know,
/// and the name it knows the same program type by. libbpf names TC
/// programs for TCX links (kernel >= 6.6) `tcx/ingress` and `tcx/egress`;
/// aya reads them as its legacy `classifier`. Each alias is no longer
/// than the name, so it is written in place, NUL-padded.
const SECTION_ALIASES: [(&[u8], &[u8]); 2] =
    [(b"tcx/ingress\0", b"classifier\0\0"), (b"tcx/egress\0", b"classifier\0")];

/// `bytes` as aya can parse them: TCX section names replaced by their
/// alias in the section-name table (`.strtab`, or `.shstrtab`) and in the
/// BTF strings (where `.BTF.ext` names the section of each function), and
/// nowhere else. Objects without such sections are returned as they are.
/// The object's digest stays that of the file.
pub fn for_aya(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let mentions = |hay: &[u8]| SECTION_ALIASES.iter().any(|(name, _)| hay.windows(name.len()).any(|w| w == *name));
    if !mentions(bytes) {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let Ok(elf) = object::File::parse(bytes) else { return std::borrow::Cow::Borrowed(bytes) };
    let ranges: Vec<(usize, usize)> = elf
        .sections()
        .filter(|s| matches!(s.name(), Ok(".strtab" | ".shstrtab" | ".BTF")))
        .filter_map(|s| s.file_range())
        .map(|(at, len)| (at as usize, (at + len) as usize))
        .filter(|&(at, end)| at <= end && end <= bytes.len())
        .collect();
    let mut out = bytes.to_vec();
    for (at, end) in ranges {
        let table = &mut out[at..end];
        for (name, alias) in SECTION_ALIASES {
            let mut i = 0;
            while i + name.len() <= table.len() {
                if &table[i..i + name.len()] == name {
                    table[i..i + name.len()].copy_from_slice(alias);
                    i += name.len();
                } else {
                    i += 1;
                }
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Inspects an ELF object compiled by clang for the BPF target.
pub fn inspect(bytes: &[u8]) -> Result<ObjectInfo, ObjectError> {
    let parsed = for_aya(bytes);
    let bytes: &[u8] = &parsed;
    let obj = Object::parse(bytes).map_err(|e| ObjectError::Parse { reason: e.to_string() })?;
    let elf = object::File::parse(bytes).map_err(|e| ObjectError::Parse { reason: e.to_string() })?;
    let btf = elf.section_by_name(".BTF").and_then(|s| s.data().ok()).and_then(btf::Btf::parse);

    let functions = obj
        .programs
        .iter()
        .map(|(name, p)| {
            let t = match p.section {
                ProgramSection::Xdp { .. } => Some(ProgramType::Xdp),
                ProgramSection::SchedClassifier => Some(ProgramType::Tc),
                ProgramSection::TracePoint => Some(ProgramType::Tracepoint),
                _ => None,
            };
            (name.clone(), t)
        })
        .collect();

    let mut maps = BTreeMap::new();
    for (name, m) in &obj.maps {
        if name.starts_with('.') {
            continue; // .rodata/.bss/.data: global variables, not spec-managed maps
        }
        let (key_id, value_id) = match m {
            aya_obj::maps::Map::Btf(b) => (b.def.btf_key_type_id, b.def.btf_value_type_id),
            _ => (0, 0),
        };
        let resolve = |id: u32, size: u32| {
            let size = size as usize;
            btf.as_ref()
                .filter(|_| id != 0)
                .and_then(|b| b.layout(id))
                .filter(|l| l.size() == size)
                .unwrap_or(Layout::Opaque { size })
        };
        maps.insert(
            name.clone(),
            MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
                key: resolve(key_id, m.key_size()),
                value: resolve(value_id, m.value_size()),
            },
        );
    }
    Ok(ObjectInfo { digest: digest(bytes), functions, maps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_sections_are_read_as_tc_programs_and_other_objects_are_left_alone() {
        let mesh: &[u8] = include_bytes!("../../bpf/mesh.bpf.o");
        let ok = |s: &str| mesh.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(ok("tcx/egress"), "the committed mesh object uses the TCX section name");
        let info = inspect(mesh).unwrap();
        assert_eq!(info.functions.get("mesh_egress"), Some(&Some(ProgramType::Tc)));
        let aliased = for_aya(mesh);
        assert_eq!(aliased.len(), mesh.len(), "rewritten in place");
        assert!(!aliased.windows(10).any(|w| w == b"tcx/egress"), "no TCX name left where aya looks");
        let counter: &[u8] = include_bytes!("../../bpf/counter.bpf.o");
        assert!(matches!(for_aya(counter), std::borrow::Cow::Borrowed(_)));
    }
}
