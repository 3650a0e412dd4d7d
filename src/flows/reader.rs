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

    /// Forgets unresolved names (once a second at most) so new rules and
    /// interfaces get named.
    fn refresh_misses(&mut self) {
        if self.last_miss_refresh.elapsed() >= Duration::from_secs(1) {
            self.rules.retain(|_, v| v.is_some());
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

/// The open ring buffer and the id of the map it reads.
struct Ring {
    ring: RingBuf<MapData>,
    map_id: u32,
}

fn open_ring(pin: &Path) -> Result<Ring, String> {
    let fd = sys::obj_get(pin).map_err(|e| format!("open `{}`: {e}", pin.display()))?;
    let map_id = sys::map_info(fd.as_fd()).map_err(|e| format!("read info of `{}`: {e}", pin.display()))?.id;
    drop(fd);
    let data = MapData::from_pin(pin).map_err(|e| format!("open `{}`: {e}", pin.display()))?;
    let map = Map::from_map_data(data).map_err(|e| format!("`{}`: {e}", pin.display()))?;
    let ring = RingBuf::try_from(map).map_err(|e| format!("`{}` is not a ring buffer: {e}", pin.display()))?;
    Ok(Ring { ring, map_id })
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
    let pin = mesh_map_pin(bpffs_root, "flow_events");
    let mut names = KernelNames::new(bpffs_root.to_path_buf());
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut ring = match open_ring(&pin) {
            Ok(r) => r,
            Err(e) => {
                if pin.exists() && last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(error = %e, "cannot read flow records yet");
                    last_error = Some(e);
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
        };
        last_error = None;
        tracing::info!(map_id = ring.map_id, "reading flow records");
        drain_until_replaced(&mut ring, &pin, hub, &mut names, stop);
    }
}

/// Drains `ring` until `stop`, or until its pin names another map.
fn drain_until_replaced(ring: &mut Ring, pin: &Path, hub: &FlowHub, names: &mut KernelNames, stop: &AtomicBool) {
    let mut offset = realtime_offset_ns();
    let mut last_check = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        wait_readable(ring.ring.as_raw_fd(), Duration::from_millis(100));
        while let Some(item) = ring.ring.next() {
            match FlowEvent::from_bytes(&item) {
                Some(e) => {
                    let time = (e.time_ns as i128 + offset).max(0) as u64;
                    batch.push(FlowRecord::from_event(&e, 0, time, names));
                }
                None => {
                    hub.counters.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(item);
            if batch.len() == BATCH {
                hub.push(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
            }
        }
        hub.push(std::mem::take(&mut batch));
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            offset = realtime_offset_ns(); // follows clock steps
            names.refresh_misses();
            if pinned_map_id(pin) != Some(ring.map_id) {
                tracing::info!("the flow ring buffer was replaced; following the new one");
                return;
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}
