//! The kernel's drop reasons by name, read from its BTF (`enum
//! skb_drop_reason`): the table differs between kernel versions, so it is
//! never built in. Names drop the `SKB_DROP_REASON_` prefix, as `perf
//! trace` and drop monitors print them (`NO_SOCKET`, `NETFILTER_DROP`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use crate::datapath::DROP_REASON_SLOTS;
use crate::object::btf::Btf;

/// Where the running kernel publishes its BTF.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Names another kernel's BTF file (a copy of a node's `vmlinux`), for
/// plans made away from the node: reason numbers differ between kernels.
pub const KERNEL_BTF_ENV: &str = "BPFSYNC_KERNEL_BTF";
/// The largest kernel BTF read (6.x kernels publish 5-6 MiB).
pub const MAX_KERNEL_BTF_BYTES: u64 = 64 << 20;
/// The name of the slot that gathers subsystem reasons and codes beyond
/// the table.
pub const SUBSYSTEM: &str = "SUBSYSTEM";

/// The running kernel's table for display, and why it is empty when it
/// could not be read (codes then show as `REASON_<n>`). Read once per
/// process; a scrape borrows it.
pub fn kernel_names() -> (&'static DropReasonNames, Option<&'static str>) {
    static EMPTY: DropReasonNames = DropReasonNames { by_code: BTreeMap::new() };
    match DropReasonNames::kernel() {
        Ok(t) => (t, None),
        Err(e) => (&EMPTY, Some(e.as_str())),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropReasonNames {
    by_code: BTreeMap<u32, String>,
}

impl DropReasonNames {
    /// The running kernel's table (or the one `BPFSYNC_KERNEL_BTF`
    /// names), read once per process: a kernel does not change its BTF
    /// while it runs.
    pub fn kernel() -> &'static Result<DropReasonNames, String> {
        static KERNEL: OnceLock<Result<DropReasonNames, String>> = OnceLock::new();
        KERNEL.get_or_init(|| match std::env::var_os(KERNEL_BTF_ENV) {
            Some(path) => Self::read(Path::new(&path)),
            None => Self::read(Path::new(KERNEL_BTF)),
        })
    }

    /// The table in the BTF file at `path`.
    pub fn read(path: &Path) -> Result<DropReasonNames, String> {
        let cannot = |e: std::io::Error| format!("cannot read kernel BTF `{}`: {e}", path.display());
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(cannot)?
            .take(MAX_KERNEL_BTF_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(cannot)?;
        if bytes.len() as u64 > MAX_KERNEL_BTF_BYTES {
            return Err(format!("kernel BTF `{}` is larger than {MAX_KERNEL_BTF_BYTES} bytes", path.display()));
        }
        Self::from_btf(&bytes).map_err(|e| format!("kernel BTF `{}`: {e}", path.display()))
    }

    pub fn from_btf(bytes: &[u8]) -> Result<DropReasonNames, String> {
        let btf = Btf::parse(bytes).ok_or("not valid BTF")?;
        let members =
            btf.enum_values("skb_drop_reason").ok_or("no `enum skb_drop_reason` (kernel older than 5.17?)")?;
        Ok(Self::from_members(members))
    }

    /// From the enum's (name, value) members; the enum's own bounds
    /// (`..._MAX`, `..._SUBSYS_MASK`) are not reasons.
    pub fn from_members(members: impl IntoIterator<Item = (String, i64)>) -> DropReasonNames {
        let by_code = members
            .into_iter()
            .filter_map(|(name, value)| {
                let short = name.strip_prefix("SKB_DROP_REASON_").or(name.strip_prefix("SKB_")).unwrap_or(&name);
                let code = u32::try_from(value).ok().filter(|c| (*c as usize) < DROP_REASON_SLOTS - 1)?;
                (short != "MAX" && short != "SUBSYS_MASK").then(|| (code, short.to_string()))
            })
            .collect();
        DropReasonNames { by_code }
    }

    /// The name of a counter slot.
    pub fn name(&self, slot: u32) -> String {
        if slot as usize == DROP_REASON_SLOTS - 1 {
            return SUBSYSTEM.into();
        }
        self.by_code.get(&slot).cloned().unwrap_or_else(|| format!("REASON_{slot}"))
    }

    pub fn code(&self, name: &str) -> Option<u32> {
        if name == SUBSYSTEM {
            return Some(DROP_REASON_SLOTS as u32 - 1);
        }
        self.by_code.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
    }

    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }

    /// Known names within three edits of `name`, closest first, for a
    /// message.
    pub fn suggest(&self, name: &str) -> Vec<&str> {
        let mut close: Vec<(usize, &str)> =
            self.by_code.values().map(|n| (edit_distance(name, n), n.as_str())).filter(|(d, _)| *d <= 3).collect();
        close.sort();
        close.into_iter().take(3).map(|(_, n)| n).collect()
    }

    /// The slots a filter skips: all but `only` when it is given,
    /// otherwise `ignore`. Unknown names come back as (list, index, name).
    pub fn skipped_slots(
        &self,
        only: &[String],
        ignore: &[String],
    ) -> Result<Vec<u32>, Vec<(&'static str, usize, String)>> {
        let (list, key) = if only.is_empty() { (ignore, "ignore") } else { (only, "only") };
        let mut codes = Vec::new();
        let mut unknown = Vec::new();
        for (i, n) in list.iter().enumerate() {
            match self.code(n) {
                Some(c) => codes.push(c),
                None => unknown.push((key, i, n.clone())),
            }
        }
        if !unknown.is_empty() {
            return Err(unknown);
        }
        codes.sort_unstable();
        codes.dedup();
        if only.is_empty() {
            Ok(codes)
        } else {
            Ok((0..DROP_REASON_SLOTS as u32).filter(|s| codes.binary_search(s).is_err()).collect())
        }
    }
}

/// Levenshtein distance over bytes (names are ASCII, at most 64 long).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> DropReasonNames {
        DropReasonNames::from_members([
            ("SKB_NOT_DROPPED_YET".to_string(), 0),
            ("SKB_CONSUMED".to_string(), 1),
            ("SKB_DROP_REASON_NOT_SPECIFIED".to_string(), 2),
            ("SKB_DROP_REASON_NO_SOCKET".to_string(), 3),
            ("SKB_DROP_REASON_MAX".to_string(), 4),
            ("SKB_DROP_REASON_SUBSYS_MASK".to_string(), 0xffff0000),
        ])
    }

    #[test]
    fn names_drop_the_prefix_and_the_bounds() {
        let t = table();
        assert_eq!(t.name(3), "NO_SOCKET");
        assert_eq!(t.name(1), "CONSUMED");
        assert_eq!(t.name(4), "REASON_4");
        assert_eq!(t.name(DROP_REASON_SLOTS as u32 - 1), SUBSYSTEM);
        assert_eq!(t.code("NO_SOCKET"), Some(3));
        assert_eq!(t.code("MAX"), None);
    }

    #[test]
    fn filters_skip_the_ignored_or_all_but_the_listed() {
        let t = table();
        assert_eq!(t.skipped_slots(&[], &["NO_SOCKET".into()]), Ok(vec![3]));
        let only = t.skipped_slots(&["NO_SOCKET".into()], &[]).unwrap();
        assert_eq!(only.len(), DROP_REASON_SLOTS - 1);
        assert!(!only.contains(&3));
        assert_eq!(t.skipped_slots(&[], &["NO_SOKET".into()]), Err(vec![("ignore", 0, "NO_SOKET".into())]));
        assert_eq!(t.suggest("NO_SOKET"), vec!["NO_SOCKET"]);
    }

    #[test]
    fn the_running_kernel_names_its_reasons() {
        // Every kernel this runs on (>= 6.6) has the enum in its BTF.
        let Ok(t) = DropReasonNames::read(Path::new(KERNEL_BTF)) else {
            assert!(!Path::new(KERNEL_BTF).exists(), "kernel BTF exists but was not read");
            return;
        };
        assert_eq!(t.name(t.code("NO_SOCKET").unwrap()), "NO_SOCKET");
        assert!(t.code("NETFILTER_DROP").is_some());
    }
}
