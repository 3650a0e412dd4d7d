//! Terraform-style text rendering of a plan.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use similar::{ChangeTag, TextDiff};

use super::{Action, Change, Kind, Plan};
use crate::codec;

/// Map-entry changes shown per map before the rest is summarised.
pub const ENTRIES_SHOWN_PER_MAP: usize = 50;

#[derive(Debug, Clone, Copy, Default)]
pub struct TextOptions {
    pub color: bool,
}

struct Paint {
    on: bool,
}

impl Paint {
    fn wrap(&self, code: &str, s: &str) -> String {
        if self.on { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() }
    }
    fn action(&self, a: Action, s: &str) -> String {
        let code = match a {
            Action::Create => "32",
            Action::Update => "33",
            Action::Replace => "35",
            Action::Delete => "31",
        };
        self.wrap(code, s)
    }
    fn bold(&self, s: &str) -> String {
        self.wrap("1", s)
    }
}

/// Renders `plan` for people.
pub fn render(plan: &Plan, opts: TextOptions) -> String {
    let p = Paint { on: opts.color };
    let mut out = String::new();
    let shown: Vec<&Change> = plan.changes.iter().filter(|c| c.part_of.is_none()).collect();

    let pending = plan.pending().count();
    if shown.is_empty() && pending > 0 {
        out.push_str(&p.bold("No changes to make now,"));
        let _ = writeln!(out, " but {pending} declared object(s) are not in place (see Pending below).");
    } else if shown.is_empty() {
        out.push_str(&p.bold("No changes."));
        out.push_str(" The node matches the spec.\n");
    } else {
        let mut used: Vec<Action> = shown
            .iter()
            .filter(|c| !(c.kind == Kind::MapEntry && is_policy_map(&map_of(&c.address))))
            .map(|c| c.action)
            .chain(plan.policy_changes.iter().map(policy_action))
            .collect();
        used.sort();
        used.dedup();
        out.push_str("bpfsync used the following symbols to indicate actions:\n");
        for a in &used {
            let _ = writeln!(out, "  {} {}", p.action(*a, &format!("{:>3}", a.symbol())), a.legend());
        }
        out.push_str("\nbpfsync will perform the following actions:\n");

        let mut per_map: BTreeMap<String, usize> = BTreeMap::new();
        let mut hidden: BTreeMap<String, usize> = BTreeMap::new();
        let mut policy_entries = 0usize;
        for c in &shown {
            if c.kind == Kind::MapEntry && is_policy_map(&map_of(&c.address)) {
                policy_entries += 1;
                continue;
            }
            if c.kind == Kind::MapEntry {
                let map = map_of(&c.address);
                let n = per_map.entry(map.clone()).or_default();
                *n += 1;
                if *n > ENTRIES_SHOWN_PER_MAP {
                    *hidden.entry(map).or_default() += 1;
                    continue;
                }
            }
            out.push('\n');
            render_change(&mut out, &p, c);
        }
        for (map, n) in hidden {
            let _ = writeln!(out, "\n  # … and {n} more changes to entries of map `{map}` (all of them: `-o json`)");
        }
        if policy_entries > 0 {
            render_policy_changes(&mut out, &p, plan, policy_entries);
        }
    }

    if !plan.errors.is_empty() {
        let _ = writeln!(out, "\n{}", p.bold("Errors (the plan cannot be applied):"));
        for e in &plan.errors {
            let _ = writeln!(out, "  {} {e}", p.wrap("31", "!"));
        }
    }

    if pending > 0 {
        let _ = writeln!(out, "\n{}", p.bold("Pending (declared, not in place until the condition clears):"));
        for c in plan.pending() {
            let _ = writeln!(out, "  {} {}: {}", p.wrap("33", "…"), c.hook, c.message);
        }
    }
    if plan.conflicts.iter().any(|c| !c.pending) {
        let _ = writeln!(out, "\n{}", p.bold("Conflicts (these hooks are left as they are):"));
        for c in plan.conflicts.iter().filter(|c| !c.pending) {
            let _ = writeln!(out, "  {} {}: {}", p.wrap("31", "!"), c.hook, c.message);
        }
    }

    if !shown.is_empty() {
        let s = plan.summary();
        let _ =
            writeln!(out, "\n{} {} to add, {} to change, {} to destroy.", p.bold("Plan:"), s.add, s.change, s.destroy);
    }
    out
}

fn policy_action(c: &crate::mesh::PolicyChange) -> Action {
    match (c.added.is_empty(), c.removed.is_empty()) {
        (false, true) => Action::Create,
        (true, false) => Action::Delete,
        _ => Action::Update,
    }
}

fn is_policy_map(map: &str) -> bool {
    crate::mesh::POLICY_MAPS.iter().any(|m| map == format!("{}/{m}", crate::mesh::PROGRAM))
}

/// Policy entries are shown as what they change in spec terms; the raw
/// entries are in `-o json`.
fn render_policy_changes(out: &mut String, p: &Paint, plan: &Plan, entries: usize) {
    for c in &plan.policy_changes {
        let action = policy_action(c);
        let _ = writeln!(
            out,
            "\n  {} {}",
            p.action(action, &format!("{:>3}", action.symbol())),
            p.bold(&format!("policy {}", c.rule))
        );
        for a in &c.removed {
            let _ = writeln!(out, "      {} {a}", p.action(Action::Delete, "-"));
        }
        for a in &c.added {
            let _ = writeln!(out, "      {} {a}", p.action(Action::Create, "+"));
        }
    }
    let what =
        if plan.policy_changes.is_empty() { " (the rules decide as before; entries are reorganised)" } else { "" };
    let _ = writeln!(
        out,
        "\n  # {entries} policy map entr{} change{what} (raw entries: `-o json`)",
        if entries == 1 { "y" } else { "ies" }
    );
}

/// `map_entry.prog/map[key]` → `prog/map`.
fn map_of(address: &str) -> String {
    let rest = address.trim_start_matches("map_entry.");
    rest.split('[').next().unwrap_or(rest).to_string()
}

fn render_change(out: &mut String, p: &Paint, c: &Change) {
    let _ = writeln!(out, "  {} {} {}", p.bold("#"), p.bold(&c.address), c.action.verb());
    let _ = writeln!(out, "  {} {}", p.action(c.action, &format!("{:>3}", c.action.symbol())), headline(c));
    let _ = writeln!(out, "        (because {})", c.reason);
    let width = [&c.before, &c.after]
        .iter()
        .filter_map(|v| v.as_ref()?.as_object())
        .flat_map(|m| m.keys())
        .map(|k| k.len())
        .max()
        .unwrap_or(0);
    let before = c.before.as_ref().map(|v| field_lines(v, c.kind, width)).unwrap_or_default();
    let after = c.after.as_ref().map(|v| field_lines(v, c.kind, width)).unwrap_or_default();
    match c.action {
        Action::Create => {
            for l in after.lines() {
                let _ = writeln!(out, "      {} {l}", p.action(Action::Create, "+"));
            }
        }
        Action::Delete => {
            for l in before.lines() {
                let _ = writeln!(out, "      {} {l}", p.action(Action::Delete, "-"));
            }
        }
        Action::Update | Action::Replace => {
            let diff = TextDiff::from_lines(&before, &after);
            for change in diff.iter_all_changes() {
                let line = change.value().trim_end_matches('\n');
                match change.tag() {
                    ChangeTag::Delete => {
                        let _ = writeln!(out, "      {} {line}", p.action(Action::Delete, "-"));
                    }
                    ChangeTag::Insert => {
                        let _ = writeln!(out, "      {} {line}", p.action(Action::Create, "+"));
                    }
                    ChangeTag::Equal => {
                        let _ = writeln!(out, "        {line}");
                    }
                }
            }
        }
    }
}

fn headline(c: &Change) -> String {
    let name = c.address.split_once('.').map_or(c.address.as_str(), |(_, rest)| rest);
    match c.kind {
        Kind::Program => format!("program {name}"),
        Kind::Attachment => format!("attachment {name}"),
        Kind::MapEntry => format!("map entry {name}"),
        Kind::Map => format!("map {name}"),
    }
}

/// One `key = value` line per field; map entries show their key once in the
/// headline, so only the value is diffed.
fn field_lines(v: &Value, kind: Kind, width: usize) -> String {
    let mut s = String::new();
    match (kind, v) {
        (Kind::MapEntry, Value::Object(m)) => {
            if let Some(value) = m.get("value") {
                match value {
                    Value::Object(fields) => {
                        for (k, fv) in fields {
                            let _ = writeln!(s, "value.{k} = {}", codec::display(fv));
                        }
                    }
                    other => {
                        let _ = writeln!(s, "value = {}", codec::display(other));
                    }
                }
            }
        }
        (_, Value::Object(m)) => {
            for (k, fv) in m {
                let _ = writeln!(s, "{k:<width$} = {}", codec::display(fv));
            }
        }
        (_, other) => {
            let _ = writeln!(s, "{}", codec::display(other));
        }
    }
    s
}
