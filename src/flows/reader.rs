//! Drains the mesh datapath's `flow_events` ring buffer into a [`FlowHub`].
//!
//! One thread: poll the ring buffer's fd, decode every record, name it
//! (interface by index, rule by id from the kernel's `rule_names`), and hand
//! the batch to the hub. The ring buffer is found by its pin; until the mesh
//! datapath is loaded the reader waits, and when a reload replaces the map
//! it follows the new one.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, RingBuf};

use super::hub::FlowHub;
use super::record::{FlowRecord, Names};
use crate::datapath::{FlowEvent, RULE_NAME_LEN};
use crate::kernel::sys;
use crate::mesh;

/// How long records may wait in the ring buffer before the reader looks.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Records handed to the hub at once (bounds the time the history is locked).
const BATCH: usize = 4096;

/// The pin of a mesh map under a bpfsync root.
pub fn mesh_map_pin(bpffs_root: &Path, map: &str) -> PathBuf {
    bpffs_root.join("maps").join(mesh::PROGRAM).join(map)
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` in nanoseconds: turns the datapath's
/// `bpf_ktime_get_ns` into Unix time.
fn realtime_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// Interface and rule names, cached; misses are retried at most once a second.
struct KernelNames {
    bpffs_root: PathBuf,
    interfaces: HashMap<u32, String>,
    rules: HashMap<u32, Option<String>>,
    rule_map: Option<OwnedFd>,
    last_miss_refresh: Instant,
}

impl KernelNames {
    fn new(bpffs_root: PathBuf) -> KernelNames {
        KernelNames {
            bpffs_root,
            interfaces: HashMap::new(),
            rules: HashMap::new(),
            rule_map: None,
            last_miss_refresh: Instant::now(),
        }
    }

    /// Forgets unresolved rule names and all interface names (once a second
    /// at most): new rules get named, and an interface index reused by
    /// another interface is not shown under the old name for long.
    fn refresh_misses(&mut self) {
        if self.last_miss_refresh.elapsed() >= Duration::from_secs(1) {
            self.rules.retain(|_, v| v.is_some());
            self.interfaces.clear();
            self.rule_map = None;
            self.last_miss_refresh = Instant::now();
        }
    }

    fn lookup_rule(&mut self, id: u32) -> Option<String> {
        if self.rule_map.is_none() {
            self.rule_map = sys::obj_get(&mesh_map_pin(&self.bpffs_root, mesh::NAMES_MAP)).ok();
        }
        let fd = self.rule_map.as_ref()?;
        let mut value = [0u8; RULE_NAME_LEN];
        match sys::map_lookup(fd.as_fd(), &id.to_ne_bytes(), &mut value) {
            Ok(true) => Some(mesh::policy::decode_rule_name(&value)),
            _ => None,
        }
    }
}

impl Names for KernelNames {
    fn interface(&mut self, ifindex: u32) -> String {
        if let Some(n) = self.interfaces.get(&ifindex) {
            return n.clone();
        }
        match sys::ifname(ifindex) {
            Some(n) => {
                self.interfaces.insert(ifindex, n.clone());
                n
            }
            None => format!("if{ifindex}"),
        }
    }

    fn rule(&mut self, rule_id: u32) -> Option<String> {
        if let Some(n) = self.rules.get(&rule_id) {
            return n.clone();
        }
        let n = self.lookup_rule(rule_id);
        self.rules.insert(rule_id, n.clone());
        n
    }
}

/// An open `flow_events` ring buffer with what naming its records needs.
pub struct Reader {
    ring: RingBuf<MapData>,
    map_id: u32,
    pin: PathBuf,
    names: KernelNames,
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, refreshed by [`Reader::tick`].
    offset: i128,
    batch: Vec<FlowRecord>,
}

impl Reader {
    /// Opens the ring buffer pinned under `bpffs_root` (the mesh datapath's).
    pub fn open(bpffs_root: &Path) -> Result<Reader, String> {
        let pin = mesh_map_pin(bpffs_root, "flow_events");
        let data = MapData::from_pin(&pin).map_err(|e| format!("open `{}`: {e}", pin.display()))?;
        let map_id = data.info().map_err(|e| format!("read info of `{}`: {e}", pin.display()))?.id();
        let map = Map::from_map_data(data).map_err(|e| format!("`{}`: {e}", pin.display()))?;
        let ring = RingBuf::try_from(map).map_err(|e| format!("`{}` is not a ring buffer: {e}", pin.display()))?;
        Ok(Reader {
            ring,
            map_id,
            pin,
            names: KernelNames::new(bpffs_root.to_path_buf()),
            offset: realtime_offset_ns(),
            batch: Vec::with_capacity(BATCH),
        })
    }

    /// Decodes everything in the ring buffer into `hub`; returns how many
    /// records were read.
    pub fn drain(&mut self, hub: &FlowHub) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            n += 1;
            match FlowEvent::from_bytes(&item) {
                Some(e) => {
                    let time = (e.time_ns as i128 + self.offset).max(0) as u64;
                    match FlowRecord::from_event(&e, 0, time, &mut self.names) {
                        Some(r) => self.batch.push(r),
                        None => {
                            hub.counters.malformed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                None => {
                    hub.counters.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(item);
            if self.batch.len() == BATCH {
                hub.push(std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH)));
            }
        }
        hub.push(std::mem::take(&mut self.batch));
        n
    }

    /// Once a second: follows clock steps, retries unknown names; false
    /// when the pin now names another map (a reload replaced it).
    fn tick(&mut self) -> bool {
        self.offset = realtime_offset_ns();
        self.names.refresh_misses();
        pinned_map_id(&self.pin) == Some(self.map_id)
    }
}

fn pinned_map_id(pin: &Path) -> Option<u32> {
    let fd = sys::obj_get(pin).ok()?;
    sys::map_info(fd.as_fd()).ok().map(|i| i.id)
}

/// Waits up to `timeout` for the fd to be readable.
fn wait_readable(fd: i32, timeout: Duration) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
}

/// Reads flow records until `stop` is set.
pub fn spawn(bpffs_root: PathBuf, hub: Arc<FlowHub>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("flow-reader".into())
        .spawn(move || run(&bpffs_root, &hub, &stop))
        .expect("spawn the flow reader")
}

fn run(bpffs_root: &Path, hub: &FlowHub, stop: &AtomicBool) {
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut reader = match Reader::open(bpffs_root) {
            Ok(r) => r,
            Err(e) => {
                if mesh_map_pin(bpffs_root, "flow_events").exists() && last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "cannot read flow records yet");
                    last_error = Some(e);
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
        };
        last_error = None;
        tracing::info!(map_id = reader.map_id, "reading flow records");
        drain_until_replaced(&mut reader, hub, stop);
    }
}

/// Drains until `stop`, or until the pin names another map.
fn drain_until_replaced(reader: &mut Reader, hub: &FlowHub, stop: &AtomicBool) {
    let mut last_tick = Instant::now();
    loop {
        // The datapath wakes the reader only when a backlog builds up (a
        // wakeup per record would cost microseconds each): poll often.
        wait_readable(reader.ring.as_raw_fd(), POLL_INTERVAL);
        reader.drain(hub);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            if !reader.tick() {
                tracing::info!("the flow ring buffer was replaced; following the new one");
                return;
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}
