//! The spec: parse, validate against the JSON Schema, deserialise, and check
//! what a schema cannot (unique names, references, addresses, ranges).
//!
//! Pure: takes text, returns the typed spec or every problem found. Checks
//! that need the ELF objects (functions, map sizes) live in `compile`.

mod diag;
pub mod mesh;
pub mod overlay;
pub mod patch;
mod source;
pub mod telemetry;
pub mod types;
pub mod yaml;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Diagnostics, pointer_to_path};
pub use source::{MAX_SPEC_BYTES, SourceError, read_limited};
pub use types::*;
use yaml::{MarkedDocument, Position};

use crate::net::Cidr;

/// The JSON Schema, the spec's contract (`bpfsync schema` prints it).
pub const SCHEMA: &str = include_str!("../../schema/bpfsync.schema.json");

/// A spec that passed every check, with what is needed to point at its
/// parts in later diagnostics.
#[derive(Debug)]
pub struct LoadedSpec {
    /// The spec to run: the file's, with the overlay merged on.
    pub spec: NodeSpec,
    pub file: PathBuf,
    pub source: String,
    pub doc: MarkedDocument,
    /// What the overlay changed, and the entries it could not apply.
    pub overlay: overlay::OverlayReport,
    /// The file's own routes, when the overlay changed the spec (the
    /// primary of a route is the file's `via`, whatever runs now).
    pub file_routes: Option<Vec<RouteSpec>>,
}

impl LoadedSpec {
    /// A diagnostic at the node `pointer` (e.g. `/programs/0/maps/1`).
    pub fn diag(&self, pointer: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(&self.file, &self.source, self.doc.position(pointer), pointer, message)
    }

    /// The routes as the spec file declares them.
    pub fn file_routes(&self) -> &[RouteSpec] {
        self.file_routes.as_deref().unwrap_or(&self.spec.routes)
    }

    /// The directory relative paths in the spec are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.file.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// A validator for the embedded schema.
///
/// The schema is written as draft 2020-12 (what editors read) but uses only
/// keywords whose meaning is the same in draft 2019-09 (`tests/schema.rs`
/// holds that to a keyword list and checks both engines agree on every
/// spec in the repository). jsonschema 0.33 builds a 2019-09 validator in
/// ~7 ms and ~7 MB, a 2020-12 one in ~60 ms and ~45 MB that it never gives
/// back — too much for the agent, which validates every spec edit. Built
/// per use: specs load rarely.
pub fn schema_validator() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).expect("embedded schema is valid JSON");
    jsonschema::draft201909::new(&schema).expect("embedded schema compiles")
}

/// Parses and validates `source` (the contents of `file`).
pub fn load(file: &Path, source: &str) -> Result<LoadedSpec, Diagnostics> {
    match load_partial(file, source) {
        (Some(loaded), diags) if diags.is_empty() => Ok(loaded),
        (_, diags) => Err(diag::finish(diags, source)),
    }
}

/// [`load`], also returning the spec when it deserialises despite its
/// diagnostics, so that later stages (objects, maps) can report their own
/// problems in the same run.
pub fn load_partial(file: &Path, source: &str) -> (Option<LoadedSpec>, Vec<Diagnostic>) {
    load_partial_with_overlay(file, source, &[])
}

/// [`load_partial`], then the overlay merged on when the file is valid on
/// its own (see [`overlay`]). Entries that no longer apply, or that make
/// the spec invalid, are superseded and reported in
/// [`LoadedSpec::overlay`]; they never make the load fail.
pub fn load_partial_with_overlay(
    file: &Path,
    source: &str,
    entries: &[overlay::OverlayEntry],
) -> (Option<LoadedSpec>, Vec<Diagnostic>) {
    match load_inner(file, source, entries) {
        Ok(loaded) => (Some(loaded), Vec::new()),
        Err((loaded, diags)) => (loaded, diags),
    }
}

/// Sorts, limits and locates diagnostics gathered from several stages.
pub fn diagnostics(diags: Vec<Diagnostic>, source: &str) -> Diagnostics {
    diag::finish(diags, source)
}

#[allow(clippy::result_large_err, reason = "the error carries the partially valid spec on purpose")]
fn load_inner(
    file: &Path,
    source: &str,
    entries: &[overlay::OverlayEntry],
) -> Result<LoadedSpec, (Option<LoadedSpec>, Vec<Diagnostic>)> {
    let mut doc = match yaml::parse(source) {
        Ok(doc) => doc,
        Err(e) => {
            let d = Diagnostic::new(file, source, e.position, "", format!("invalid YAML: {}", e.message));
            return Err((None, vec![d]));
        }
    };
    let mut diags: Vec<Diagnostic> =
        doc.problems.iter().map(|(ptr, pos, msg)| Diagnostic::new(file, source, *pos, ptr, msg.clone())).collect();
    diags.extend(schema_diagnostics(file, source, &doc));
    // The file's document, kept only when an overlay will be merged on.
    let file_value = (!entries.is_empty()).then(|| doc.value.clone());
    // Positions live in `doc`'s indexes; the value itself is not needed again.
    let spec: NodeSpec = match serde_json::from_value(std::mem::take(&mut doc.value)) {
        Ok(spec) => spec,
        Err(_) if !diags.is_empty() => return Err((None, diags)),
        Err(e) => {
            // The schema should have caught this; report it rather than panic.
            let d = Diagnostic::new(file, source, Position { line: 1, col: 1 }, "", format!("invalid spec: {e}"));
            return Err((None, vec![d]));
        }
    };
    // The shapes deserialise: check meaning too, so every problem is
    // reported in one go, not only the schema's.
    let mut loaded = LoadedSpec {
        spec,
        file: file.to_path_buf(),
        source: source.to_string(),
        doc,
        overlay: overlay::OverlayReport::default(),
        file_routes: None,
    };
    diags.extend(semantic_checks(&loaded));
    if !diags.is_empty() {
        return Err((Some(loaded), diags));
    }
    if let Some(value) = file_value {
        merge_overlay(&mut loaded, value, entries);
    }
    Ok(loaded)
}

/// Merges the overlay onto a valid file spec: the patched spec must pass
/// every check the file did, or none of the entries is used.
fn merge_overlay(loaded: &mut LoadedSpec, value: serde_json::Value, entries: &[overlay::OverlayEntry]) {
    let (patched, mut report) = overlay::merge(&value, entries);
    drop(value);
    if report.applied.is_empty() {
        loaded.overlay = report;
        return;
    }
    let invalid = |report: &mut overlay::OverlayReport, why: String| {
        for e in std::mem::take(&mut report.applied) {
            report.superseded.push(overlay::EntryNote { id: e.id, reason: why.clone() });
        }
    };
    let schema_error = schema_validator().iter_errors(&patched).next().map(|e| e.to_string());
    if let Some(e) = schema_error {
        invalid(&mut report, format!("together with the spec file it is invalid: {e}"));
        loaded.overlay = report;
        return;
    }
    match serde_json::from_value::<NodeSpec>(patched) {
        Ok(spec) => {
            let file_spec = std::mem::replace(&mut loaded.spec, spec);
            let problems = semantic_checks(loaded);
            if let Some(p) = problems.first() {
                loaded.spec = file_spec;
                invalid(&mut report, format!("together with the spec file it is invalid: {}", p.message));
            } else {
                loaded.file_routes = Some(file_spec.routes);
            }
        }
        Err(e) => invalid(&mut report, format!("together with the spec file it is invalid: {e}")),
    }
    loaded.overlay = report;
}

fn schema_diagnostics(file: &Path, source: &str, doc: &MarkedDocument) -> Vec<Diagnostic> {
    use jsonschema::error::ValidationErrorKind as Kind;
    let mut out = Vec::new();
    let validator = schema_validator();
    for err in validator.iter_errors(&doc.value) {
        let pointer = err.instance_path.as_str().to_string();
        match &err.kind {
            Kind::AdditionalProperties { unexpected } => {
                for key in unexpected {
                    let ptr = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                    let pos = doc.key_position(&ptr);
                    out.push(Diagnostic::new(file, source, pos, &ptr, format!("unknown key `{key}`")));
                }
            }
            Kind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                let msg = format!("missing required key `{name}`");
                out.push(Diagnostic::new(file, source, doc.position(&pointer), &pointer, msg));
            }
            Kind::Type { kind } => {
                let expected = match kind {
                    jsonschema::error::TypeKind::Single(t) => format!("{t}"),
                    jsonschema::error::TypeKind::Multiple(ts) => {
                        ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" or ")
                    }
                };
                let msg = format!("expected {expected}, found {}", describe(&err.instance));
                out.push(Diagnostic::new(file, source, doc.position(&pointer), &pointer, msg));
            }
            Kind::Constant { expected_value } => {
                let msg = format!(
                    "expected `{}`, found {}",
                    expected_value.as_str().unwrap_or_default(),
                    describe(&err.instance)
                );
                out.push(Diagnostic::new(file, source, doc.position(&pointer), &pointer, msg));
            }
            Kind::Pattern { .. } => {
                let what = schema_description(err.schema_path.as_str()).unwrap_or_else(|| "the expected format".into());
                let msg = format!("{} is not {what}", describe(&err.instance));
                out.push(Diagnostic::new(file, source, doc.position(&pointer), &pointer, msg));
            }
            _ => {
                let msg = lowercase_first(&err.to_string());
                out.push(Diagnostic::new(file, source, doc.position(&pointer), &pointer, msg));
            }
        }
    }
    out
}

/// The `description` of the schema node holding the keyword at
/// `schema_path` (following one `$ref`), for friendlier messages.
fn schema_description(schema_path: &str) -> Option<String> {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).ok()?;
    let parent = schema_path.rsplit_once('/')?.0;
    // The path runs through `$ref`s: follow them segment by segment.
    let mut node = &schema;
    for seg in parent.split('/').skip(1) {
        node = if seg == "$ref" {
            schema.pointer(node.get("$ref")?.as_str()?.strip_prefix('#')?)?
        } else {
            match node {
                serde_json::Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
                _ => node.get(seg)?,
            }
        };
    }
    if let Some(d) = node.get("description").and_then(|d| d.as_str()) {
        return Some(d.to_string());
    }
    let target = node.get("$ref")?.as_str()?.strip_prefix('#')?;
    schema.pointer(target)?.get("description")?.as_str().map(str::to_string)
}

fn describe(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => format!("boolean `{b}`"),
        serde_json::Value::Number(n) => format!("number `{n}`"),
        serde_json::Value::String(s) => format!("string `{s}`"),
        serde_json::Value::Array(_) => "a list".into(),
        serde_json::Value::Object(_) => "a mapping".into(),
    }
}

fn lowercase_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Checks across the document: unique names, resolvable references,
/// parseable addresses, sane ranges.
fn semantic_checks(l: &LoadedSpec) -> Vec<Diagnostic> {
    let s = &l.spec;
    let mut d = Vec::new();

    let mut programs: HashMap<&str, &ProgramSpec> = HashMap::new();
    for (i, p) in s.programs.iter().enumerate() {
        if programs.insert(p.name.as_str(), p).is_some() {
            d.push(l.diag(&format!("/programs/{i}/name"), format!("duplicate program name `{}`", p.name)));
        }
        match (&p.builtin, &p.object) {
            (Some(_), Some(_)) => {
                d.push(l.diag(&format!("/programs/{i}/object"), "`builtin` and `object` are exclusive: give one"))
            }
            (None, None) => d.push(l.diag(&format!("/programs/{i}"), "program needs `builtin` or `object`")),
            _ => {}
        }
        let mut maps = HashSet::new();
        for (j, m) in p.maps.iter().enumerate() {
            if !maps.insert(m.name.as_str()) {
                d.push(l.diag(&format!("/programs/{i}/maps/{j}/name"), format!("map `{}` listed twice", m.name)));
            }
        }
    }
    for (i, p) in s.programs.iter().enumerate() {
        if let Some(owner) = &p.share_maps {
            let ptr = format!("/programs/{i}/share-maps");
            match programs.get(owner.as_str()) {
                None => d.push(l.diag(&ptr, format!("unknown program `{owner}`"))),
                Some(o) if o.name == p.name => d.push(l.diag(&ptr, "a program cannot share maps with itself")),
                Some(o) if o.share_maps.is_some() => {
                    d.push(l.diag(&ptr, format!("`{owner}` shares maps itself; name the program that owns them")))
                }
                Some(_) if !p.maps.is_empty() => d.push(l.diag(
                    &format!("/programs/{i}/maps"),
                    format!("maps are shared with `{owner}`: declare their entries there"),
                )),
                Some(_) => {}
            }
        }
    }

    let check_program_ref = |d: &mut Vec<Diagnostic>, ptr: String, name: &str, want: ProgramType| match programs
        .get(name)
    {
        None => d.push(l.diag(&ptr, format!("unknown program `{name}`"))),
        Some(p) if p.program_type != want => d.push(l.diag(
            &ptr,
            format!("program `{name}` is of type `{}`, this hook needs `{}`", p.program_type.as_str(), want.as_str()),
        )),
        Some(_) => {}
    };

    let mut ifaces = HashSet::new();
    for (i, iface) in s.interfaces.iter().enumerate() {
        if !ifaces.insert(iface.name.as_str()) {
            d.push(l.diag(&format!("/interfaces/{i}/name"), format!("interface `{}` listed twice", iface.name)));
        }
        if let Some(x) = &iface.xdp {
            check_program_ref(&mut d, format!("/interfaces/{i}/xdp/program"), &x.program, ProgramType::Xdp);
        }
        if let Some(tc) = &iface.tc {
            for (dir, list) in [("ingress", &tc.ingress), ("egress", &tc.egress)] {
                let mut seen = HashSet::new();
                for (j, name) in list.iter().enumerate() {
                    let ptr = format!("/interfaces/{i}/tc/{dir}/{j}");
                    if !seen.insert(name) {
                        d.push(l.diag(&ptr, format!("program `{name}` listed twice on {dir}")));
                    }
                    check_program_ref(&mut d, ptr, name, ProgramType::Tc);
                }
            }
        }
    }
    check_mesh(l, s, &mut d);
    check_flows(l, s, &mut d);
    check_telemetry(l, s, &mut d);
    let mut tps = HashSet::new();
    for (i, tp) in s.tracepoints.iter().enumerate() {
        check_program_ref(&mut d, format!("/tracepoints/{i}/program"), &tp.program, ProgramType::Tracepoint);
        if !tps.insert((&tp.event, &tp.program)) {
            d.push(l.diag(&format!("/tracepoints/{i}"), format!("`{}` on `{}` listed twice", tp.program, tp.event)));
        }
    }

    let mut prefixes = HashMap::new();
    for (i, r) in s.routes.iter().enumerate() {
        let ptr = format!("/routes/{i}/prefix");
        match r.prefix.parse::<Cidr>() {
            Ok(c) => {
                if prefixes.insert(c, i).is_some() {
                    d.push(l.diag(&ptr, format!("duplicate route for `{}`", r.prefix)));
                }
                let hops = std::iter::once(("via".to_string(), &r.via))
                    .chain(r.fallback.iter().enumerate().map(|(j, h)| (format!("fallback/{j}"), h)));
                for (hp, hop) in hops {
                    let base = format!("/routes/{i}/{hp}");
                    match hop.neighbor.parse::<IpAddr>() {
                        Ok(ip) if ip.is_ipv4() != c.addr.is_ipv4() => d.push(l.diag(
                            &format!("{base}/neighbor"),
                            format!("neighbour `{ip}` is not in the address family of `{}`", r.prefix),
                        )),
                        Ok(_) => {}
                        Err(_) => d.push(
                            l.diag(&format!("{base}/neighbor"), format!("`{}` is not an IP address", hop.neighbor)),
                        ),
                    }
                    // MACs are checked by the schema's pattern.
                }
            }
            Err(e) => d.push(l.diag(&ptr, e)),
        }
        if let Some(h) = &r.health {
            check_health(l, &mut d, &format!("/routes/{i}/health"), h, s.health.as_ref());
        }
    }
    if let Some(h) = &s.health {
        check_health(l, &mut d, "/health", h, None);
    }

    let mut policies = HashSet::new();
    for (i, p) in s.policies.iter().enumerate() {
        if !policies.insert(p.name.as_str()) {
            d.push(l.diag(&format!("/policies/{i}/name"), format!("duplicate policy name `{}`", p.name)));
        }
        let sections = [
            ("ingress", p.ingress.as_deref().unwrap_or(&[])),
            ("egress", p.egress.as_deref().unwrap_or(&[])),
            ("deny", &p.deny[..]),
        ];
        for (section, rules) in sections {
            for (j, rule) in rules.iter().enumerate() {
                let base = format!("/policies/{i}/{section}/{j}");
                check_rule(l, &mut d, &base, section, rule);
            }
        }
    }

    let mut fallback_names = HashSet::new();
    for (i, f) in s.fallback.iter().enumerate() {
        if !fallback_names.insert(f.name.as_str()) {
            d.push(l.diag(&format!("/fallback/{i}/name"), format!("duplicate fallback rule `{}`", f.name)));
        }
        let ptr = format!("/fallback/{i}/route");
        match f.route.parse::<Cidr>().ok().and_then(|c| prefixes.get(&c)) {
            None => d.push(l.diag(&ptr, format!("no route with prefix `{}`", f.route))),
            Some(&ri) if s.routes[ri].fallback.is_empty() => {
                d.push(l.diag(&ptr, format!("route `{}` declares no `fallback` hops", f.route)))
            }
            Some(_) => {}
        }
        let needs_threshold = matches!(
            f.when.metric,
            FallbackMetric::DropRate | FallbackMetric::ProbeLoss | FallbackMetric::LatencyP99Ms
        );
        if needs_threshold && f.when.above.is_none() {
            d.push(l.diag(&format!("/fallback/{i}/when"), "this metric needs a threshold: add `above`"));
        }
        if let (Some(above), Some(below)) = (f.when.above, f.recover.as_ref().and_then(|r| r.below))
            && below >= above
        {
            // Without a gap between the two, a value near the threshold
            // would switch and revert at every evaluation.
            d.push(l.diag(
                &format!("/fallback/{i}/recover/below"),
                format!("`below` ({below}) must be under `above` ({above}), or the rule would flap"),
            ));
        }
        for (ptr, dur) in [
            (format!("/fallback/{i}/when/for"), f.when.for_duration.as_ref()),
            (format!("/fallback/{i}/recover/for"), f.recover.as_ref().and_then(|r| r.for_duration.as_ref())),
        ] {
            if let Some(dur) = dur
                && dur.to_duration().is_none()
            {
                d.push(l.diag(&ptr, "not a duration: use seconds or a number with `ms`, `s`, `m`, `h`"));
            }
        }
    }
    d
}

/// The probe settings' limits: what a hop's bounded history can hold, and
/// an interval the prober can keep (1,000 hops at 10 ms is 100,000 echoes a
/// second).
pub const MIN_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);
pub const MAX_PROBE_SAMPLES: u64 = 3600;

/// `health` settings make sense alone and merged over `global` (a route's
/// override of the global ones).
fn check_health(l: &LoadedSpec, d: &mut Vec<Diagnostic>, base: &str, h: &HealthSpec, global: Option<&HealthSpec>) {
    let mut dur = |key: &str, v: Option<&DurationSpec>| -> Option<std::time::Duration> {
        let v = v?;
        let parsed = v.to_duration();
        if parsed.is_none() {
            d.push(
                l.diag(&format!("{base}/{key}"), "not a duration: use seconds or a number with `ms`, `s`, `m`, `h`"),
            );
        }
        parsed
    };
    let own_interval = dur("probe-interval", h.probe_interval.as_ref());
    let own_timeout = dur("probe-timeout", h.probe_timeout.as_ref());
    let own_window = dur("window", h.window.as_ref());
    let from_global = |f: fn(&HealthSpec) -> Option<&DurationSpec>| global.and_then(f).and_then(|v| v.to_duration());
    let interval =
        own_interval.or_else(|| from_global(|g| g.probe_interval.as_ref())).unwrap_or(DEFAULT_PROBE_INTERVAL);
    let timeout = own_timeout.or_else(|| from_global(|g| g.probe_timeout.as_ref()));
    let window = own_window.or_else(|| from_global(|g| g.window.as_ref()));
    if interval < MIN_PROBE_INTERVAL {
        d.push(l.diag(&format!("{base}/probe-interval"), format!("at least {MIN_PROBE_INTERVAL:?} between probes")));
    }
    if let Some(t) = timeout
        && (t > interval || t.is_zero())
    {
        // One echo in flight per hop: a longer wait would skip the next.
        let (at, from) = if own_timeout.is_some() {
            ("probe-timeout", "")
        } else {
            ("probe-interval", ", from the global `health`")
        };
        d.push(l.diag(
            &format!("{base}/{at}"),
            format!("`probe-timeout` ({t:?}{from}) must be above zero and at most `probe-interval` ({interval:?})"),
        ));
    }
    if let Some(w) = window
        && !interval.is_zero()
    {
        let samples = w.as_nanos() / interval.as_nanos();
        let at = if own_window.is_some() { "window" } else { "probe-interval" };
        if samples > MAX_PROBE_SAMPLES as u128 {
            d.push(l.diag(
                &format!("{base}/{at}"),
                format!(
                    "`window` ({w:?}) holds {samples} probes at {interval:?}; a hop keeps at most {MAX_PROBE_SAMPLES}"
                ),
            ));
        }
        let min = h.min_samples.or(global.and_then(|g| g.min_samples)).unwrap_or(DEFAULT_MIN_SAMPLES);
        if samples < min as u128 {
            d.push(l.diag(
                &format!("{base}/{at}"),
                format!("`window` ({w:?}) holds {samples} probes at {interval:?}, fewer than `min-samples` ({min}): no rule could ever judge"),
            ));
        }
    }
}

/// Defaults of the `health` settings.
pub const DEFAULT_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
pub const DEFAULT_MIN_SAMPLES: u32 = 5;

fn check_rule(l: &LoadedSpec, d: &mut Vec<Diagnostic>, base: &str, section: &str, rule: &PolicyRule) {
    let peers_ok = match section {
        "ingress" => rule.to.is_empty(),
        "egress" => rule.from.is_empty(),
        _ => true,
    };
    if !peers_ok {
        let (key, hint) = if section == "ingress" { ("to", "from") } else { ("from", "to") };
        d.push(l.diag(&format!("{base}/{key}"), format!("`{key}` is not allowed in {section} rules: use `{hint}`")));
    }
    let mut families = HashSet::new();
    for (key, list) in [("from", &rule.from), ("to", &rule.to), ("except", &rule.except)] {
        for (k, text) in list.iter().enumerate() {
            match text.parse::<Cidr>() {
                Ok(c) => {
                    if key != "except" {
                        families.insert(c.addr.is_ipv4());
                    }
                }
                Err(e) => d.push(l.diag(&format!("{base}/{key}/{k}"), e)),
            }
        }
    }
    for (k, text) in rule.except.iter().enumerate() {
        let Ok(hole) = text.parse::<Cidr>() else { continue };
        let peers = rule.from.iter().chain(&rule.to).filter_map(|p| p.parse::<Cidr>().ok());
        if !peers.clone().any(|p| p.contains(&hole)) {
            d.push(l.diag(&format!("{base}/except/{k}"), format!("`{text}` is not inside any peer of this rule")));
        }
    }
    for (k, port) in rule.ports.iter().enumerate() {
        if let Some(end) = port.end_port
            && end < port.port
        {
            d.push(l.diag(
                &format!("{base}/ports/{k}/end-port"),
                format!("`end-port` {end} is below `port` {}", port.port),
            ));
        }
        if matches!(port.protocol, Protocol::Icmp | Protocol::Icmpv6) {
            d.push(
                l.diag(&format!("{base}/ports/{k}/protocol"), "icmp has no ports: use `protocol: icmp` on the rule"),
            );
        }
    }
    if rule.protocol.is_some() && !rule.ports.is_empty() {
        d.push(l.diag(&format!("{base}/protocol"), "give either `protocol` or `ports`, not both"));
    }
}

/// The mesh datapath owns the XDP hook of every interface it runs on, and
/// its program names.
fn check_flows(l: &LoadedSpec, s: &NodeSpec, d: &mut Vec<Diagnostic>) {
    let Some(f) = &s.flows else { return };
    if !mesh::in_use(s) {
        d.push(l.diag(
            "/flows",
            "flow records come from the mesh datapath, which this spec does not use (no policies, routes or `mesh:` interfaces)",
        ));
    }
    // The schema checks the duration syntax and the minimum of 1.
    for (ptr, dur) in [("/flows/report-interval", &f.report_interval), ("/flows/drop-window", &f.drop_window)] {
        if dur.as_ref().and_then(|d| d.to_duration()).is_some_and(|t| t.is_zero()) {
            d.push(l.diag(ptr, "must be longer than zero (to stop flow records, set `enabled: false`)"));
        }
    }
}

/// Watches: label-safe unique names (the schema checks the characters),
/// prefixes that parse and belong to one watch, within the maps' sizes.
/// Drop reason names are checked against the kernel when compiling.
fn check_telemetry(l: &LoadedSpec, s: &NodeSpec, d: &mut Vec<Diagnostic>) {
    let Some(t) = &s.telemetry else { return };
    for (name, _, _) in telemetry::programs(t) {
        if let Some(i) = s.programs.iter().position(|p| p.name == name) {
            d.push(l.diag(
                &format!("/programs/{i}/name"),
                format!(
                    "`{name}` is the name of a built-in telemetry program, which this spec uses: pick another name"
                ),
            ));
        }
    }
    if let Some(tcp) = &t.tcp {
        let mut names: HashMap<&str, usize> = HashMap::new();
        // By the trie's form: `10.0.0.0/8` and `::ffff:10.0.0.0/104` are
        // one key there.
        let mut prefixes: HashMap<String, usize> = HashMap::new();
        let mut count = 0usize;
        for (i, w) in tcp.watch.iter().enumerate() {
            let base = format!("/telemetry/tcp/watch/{i}");
            if w.name == "other" {
                d.push(
                    l.diag(&format!("{base}/name"), "`other` names the addresses no watch covers: pick another name"),
                );
            }
            if let Some(first) = names.insert(w.name.as_str(), i) {
                d.push(
                    l.diag(&format!("{base}/name"), format!("watch `{}` is named twice (also watch[{first}])", w.name)),
                );
            }
            for (j, text) in w.prefixes.iter().enumerate() {
                count += 1;
                match text.parse::<Cidr>() {
                    Err(e) => d.push(l.diag(&format!("{base}/prefixes/{j}"), e)),
                    Ok(c) => {
                        if let Some(other) = prefixes.insert(telemetry::trie_cidr(&c), i) {
                            d.push(l.diag(
                                &format!("{base}/prefixes/{j}"),
                                format!("`{text}` is already watched by `{}`", tcp.watch[other].name),
                            ));
                        }
                    }
                }
            }
        }
        if tcp.watch.len() > telemetry::MAX_WATCHES {
            let most = telemetry::MAX_WATCHES;
            d.push(l.diag("/telemetry/tcp/watch", format!("{} watches, at most {most}", tcp.watch.len())));
        }
        if count > telemetry::MAX_PREFIXES {
            let most = telemetry::MAX_PREFIXES;
            d.push(l.diag("/telemetry/tcp/watch", format!("{count} prefixes over all watches, at most {most}")));
        }
    }
    if let Some(drops) = &t.drops
        && !drops.only.is_empty()
        && !drops.ignore.is_empty()
    {
        d.push(l.diag("/telemetry/drops/ignore", "give either `only` or `ignore`, not both"));
    }
}

fn check_mesh(l: &LoadedSpec, s: &NodeSpec, d: &mut Vec<Diagnostic>) {
    if !mesh::in_use(s) {
        return;
    }
    for (i, p) in s.programs.iter().enumerate() {
        if mesh::PROGRAMS.contains(&p.name.as_str()) {
            d.push(l.diag(
                &format!("/programs/{i}/name"),
                format!(
                    "`{}` is the name of the built-in mesh datapath, which this spec uses: pick another name",
                    p.name
                ),
            ));
        }
    }
    let mesh_ifaces = mesh::interfaces(s);
    for (i, iface) in s.interfaces.iter().enumerate() {
        if let (Some(x), Some((_, why))) = (&iface.xdp, mesh_ifaces.get(&iface.name)) {
            d.push(l.diag(
                &format!("/interfaces/{i}/xdp"),
                format!(
                    "`{}` runs the mesh datapath ({why}), which needs its XDP hook, but `xdp` attaches `{}` here",
                    iface.name, x.program
                ),
            ));
        }
    }
}
