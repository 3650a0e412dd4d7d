//! Where flow records go once read: a bounded history for `/flows`, live
//! subscribers (`--follow`), counters for `/metrics`, and export queues.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::export::ExportQueue;
use super::filter::Filter;
use super::record::{FlowRecord, Protocol, RecordKind, Verdict};
use crate::datapath::{DIRECTION_NAMES, FLOW_VERDICT_NAMES};
use crate::model::Direction;

/// Protocol label values of the flow counters.
pub const PROTOCOL_LABELS: [&str; 5] = ["tcp", "udp", "icmp", "icmpv6", "other"];

fn protocol_slot(p: Protocol) -> usize {
    match p {
        Protocol::TCP => 0,
        Protocol::UDP => 1,
        Protocol::ICMP => 2,
        Protocol::ICMPV6 => 3,
        _ => PROTOCOL_LABELS.len() - 1,
    }
}

const CELLS: usize = FLOW_VERDICT_NAMES.len() * DIRECTION_NAMES.len() * PROTOCOL_LABELS.len();

/// Counters over every record read (not only those still in the history).
#[derive(Default)]
pub struct FlowCounters {
    /// Flows seen: `new` and `drop` records, by verdict × direction × protocol.
    pub flows: [AtomicU64; CELLS],
    /// Packets and bytes of all records (new, update, drop).
    pub packets: [AtomicU64; CELLS],
    pub bytes: [AtomicU64; CELLS],
    /// Records read from the ring buffer.
    pub records: AtomicU64,
    /// Records the reader could not decode (too short).
    pub malformed: AtomicU64,
}

impl FlowCounters {
    /// The cell of a record's values (typed: no names compared per record;
    /// the orders are those of `FLOW_VERDICT_NAMES` and `DIRECTION_NAMES`).
    pub fn cell(verdict: Verdict, direction: Direction, protocol: Protocol) -> usize {
        let verdict = match verdict {
            Verdict::Forwarded => 0,
            Verdict::Dropped => 1,
            Verdict::Redirected => 2,
        };
        let direction = match direction {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        (verdict * DIRECTION_NAMES.len() + direction) * PROTOCOL_LABELS.len() + protocol_slot(protocol)
    }

    /// (verdict, direction, protocol) of a cell index.
    pub fn labels(cell: usize) -> (&'static str, &'static str, &'static str) {
        let p = cell % PROTOCOL_LABELS.len();
        let rest = cell / PROTOCOL_LABELS.len();
        (
            FLOW_VERDICT_NAMES[rest / DIRECTION_NAMES.len()],
            DIRECTION_NAMES[rest % DIRECTION_NAMES.len()],
            PROTOCOL_LABELS[p],
        )
    }

    pub const CELLS: usize = CELLS;

    fn count(&self, r: &FlowRecord) {
        let c = Self::cell(r.verdict, r.direction, r.protocol);
        if r.kind != RecordKind::Update {
            self.flows[c].fetch_add(1, Ordering::Relaxed);
        }
        self.packets[c].fetch_add(r.packets, Ordering::Relaxed);
        self.bytes[c].fetch_add(r.bytes, Ordering::Relaxed);
        self.records.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `/flows` asks for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub filter: Filter,
    pub since: Option<u64>,
    pub until: Option<u64>,
    /// Only the last N matching records of the history.
    pub last: Option<usize>,
    /// Only records after this sequence number.
    pub after_seq: Option<u64>,
}

impl Query {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.since.is_none_or(|t| r.time >= t)
            && self.until.is_none_or(|t| r.time <= t)
            && self.after_seq.is_none_or(|s| r.seq > s)
            && self.filter.matches(r)
    }
}

struct History {
    records: VecDeque<Arc<FlowRecord>>,
    capacity: usize,
    next_seq: u64,
}

pub struct FlowHub {
    history: Mutex<History>,
    pub counters: FlowCounters,
    live: broadcast::Sender<Arc<FlowRecord>>,
    exports: Vec<Arc<ExportQueue>>,
}

impl FlowHub {
    /// A hub keeping the last `capacity` records.
    pub fn new(capacity: usize, exports: Vec<Arc<ExportQueue>>) -> FlowHub {
        let (live, _) = broadcast::channel(16384);
        FlowHub {
            history: Mutex::new(History {
                records: VecDeque::with_capacity(capacity.min(1 << 16)),
                capacity,
                next_seq: 1,
            }),
            counters: FlowCounters::default(),
            live,
            exports,
        }
    }

    pub fn exports(&self) -> &[Arc<ExportQueue>] {
        &self.exports
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.history.lock().unwrap().next_seq
    }

    /// Takes a batch of records (their `seq` is assigned here, in order).
    pub fn push(&self, batch: Vec<FlowRecord>) {
        if batch.is_empty() {
            return;
        }
        let mut shared = Vec::with_capacity(batch.len());
        {
            let mut h = self.history.lock().unwrap();
            for mut r in batch {
                r.seq = h.next_seq;
                h.next_seq += 1;
                self.counters.count(&r);
                let r = Arc::new(r);
                if h.capacity > 0 {
                    if h.records.len() == h.capacity {
                        h.records.pop_front();
                    }
                    h.records.push_back(r.clone());
                }
                shared.push(r);
            }
        }
        for q in &self.exports {
            q.push_all(&shared);
        }
        if self.live.receiver_count() > 0 {
            for r in shared {
                let _ = self.live.send(r);
            }
        }
    }

    /// Matching records of the history, oldest first.
    pub fn query(&self, q: &Query) -> Vec<Arc<FlowRecord>> {
        let h = self.history.lock().unwrap();
        let mut out: Vec<Arc<FlowRecord>> = match q.last {
            Some(n) => {
                let mut v: Vec<_> = h.records.iter().rev().filter(|r| q.matches(r)).take(n).cloned().collect();
                v.reverse();
                v
            }
            None => h.records.iter().filter(|r| q.matches(r)).cloned().collect(),
        };
        out.shrink_to_fit();
        out
    }

    /// Subscribes to records from now on; returns the subscription and the
    /// last sequence number already in the history (records up to it are
    /// for [`query`](Self::query), later ones come through the subscription).
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<FlowRecord>>, u64) {
        let h = self.history.lock().unwrap();
        (self.live.subscribe(), h.next_seq - 1)
    }

    pub fn len(&self) -> usize {
        self.history.lock().unwrap().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for FlowHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowHub").field("history", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::record::tests::{FixedNames, event};

    fn record(dport: u16, verdict: u8) -> FlowRecord {
        FlowRecord::from_event(
            &event(if verdict == 1 { 2 } else { 0 }, verdict, 17, 1000, dport, 7),
            0,
            dport as u64,
            &mut FixedNames,
        )
        .expect("a defined event")
    }

    #[test]
    fn the_history_keeps_the_last_records_and_counts_all() {
        let hub = FlowHub::new(3, vec![]);
        hub.push((1..=5).map(|p| record(p, 0)).collect());
        let all = hub.query(&Query::default());
        assert_eq!(all.iter().map(|r| r.destination.port).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(hub.counters.records.load(Ordering::Relaxed), 5);
        let c = FlowCounters::cell(Verdict::Forwarded, Direction::Ingress, Protocol::UDP);
        assert_eq!(hub.counters.flows[c].load(Ordering::Relaxed), 5);
        assert_eq!(FlowCounters::labels(c), ("FORWARDED", "ingress", "udp"));
    }

    #[test]
    fn every_cell_is_labelled_with_the_values_it_counts() {
        let mut seen = std::collections::BTreeSet::new();
        for v in [Verdict::Forwarded, Verdict::Dropped, Verdict::Redirected] {
            for d in [Direction::Ingress, Direction::Egress] {
                for p in [Protocol::TCP, Protocol::UDP, Protocol::ICMP, Protocol::ICMPV6, Protocol(47)] {
                    let c = FlowCounters::cell(v, d, p);
                    let name = if p == Protocol(47) { "other".to_string() } else { p.to_string() };
                    assert_eq!(FlowCounters::labels(c), (v.as_str(), d.as_str(), name.as_str()));
                    seen.insert(c);
                }
            }
        }
        assert_eq!(seen.len(), FlowCounters::CELLS);
    }

    #[test]
    fn queries_take_the_last_matching_and_respect_time_and_sequence() {
        let hub = FlowHub::new(100, vec![]);
        hub.push((1..=10).map(|p| record(p, (p % 2) as u8)).collect());
        let mut q = Query { last: Some(2), ..Default::default() };
        q.filter = Filter::from_cli_tokens(&["--verdict", "DROPPED"]).unwrap();
        assert_eq!(hub.query(&q).iter().map(|r| r.destination.port).collect::<Vec<_>>(), [7, 9]);
        let window = Query { since: Some(3), until: Some(5), ..Default::default() };
        assert_eq!(hub.query(&window).len(), 3);
        let after = Query { after_seq: Some(8), ..Default::default() };
        assert_eq!(hub.query(&after).len(), 2);
    }

    #[test]
    fn subscribers_get_what_comes_after_their_snapshot() {
        let hub = FlowHub::new(100, vec![]);
        hub.push(vec![record(1, 0)]);
        let (mut rx, upto) = hub.subscribe();
        assert_eq!(upto, 1);
        hub.push(vec![record(2, 0)]);
        let r = rx.try_recv().unwrap();
        assert_eq!((r.seq, r.destination.port), (2, 2));
    }
}
