//! The fault timeline (`faultline run/serve --gpu-trace PATH`): a bounded
//! ring of timestamped device events, with the guest driver's events merged
//! in from its trace ring (`faultline_abi::trace`), written at exit as
//! Chrome trace-event JSON that Perfetto's UI and chrome://tracing open.
//!
//! The ring keeps the **last** `capacity` events and counts the ones it
//! overwrote: a trace is wanted most for a run that ended badly (a hang, a
//! timeout, a failed test), whose story is at its end, while its start is
//! routine. Memory is bounded by `capacity` × 40 bytes (40 MiB at the
//! default million), allocated as events arrive.
//!
//! Clocks: device events carry the device's clock (ns since the device was
//! created, the TIMESTAMP register's). Driver events carry the guest's TSC
//! and are placed on the device clock at export with the pairing the
//! driver made at bind time (`regs::TRACE_SYNC`): the device sampled its
//! clock and the host TSC at the TRACE_SYNC write, the driver reported the
//! TSC it read around that write, so `offset = host TSC - guest TSC`
//! (KVM gives each VM its own TSC offset, so this is rarely 0). The host
//! TSC's rate is measured between the trace's start and its export. Under
//! a guest TSC that runs at another rate than the host's (QEMU TCG) the
//! driver's events drift from the device's by the rate difference times
//! the time since the pairing; without a pairing they are placed as if
//! the offset were 0, and `otherData.clock` says so.

use std::io::{self, Write};

use faultline_abi::{Access, CtlOp, Opcode, Status, TraceKind};

/// Events the ring keeps by default (`--gpu-trace`).
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// One device or driver event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A fault entry was written to the fault buffer.
    FaultRaised {
        context: u32,
        va: u64,
        access: u8,
        channel: u8,
    },
    /// An MSI vector was sent.
    Msi { vector: u32 },
    /// A REPLAY doorbell was processed (`replay_seq` after it).
    Replay { seq: u32 },
    /// The device took control entry `seq` (raw `CtlOp` `op`).
    CtlStart {
        seq: u32,
        op: u32,
        context: u32,
        start: u64,
        len: u64,
    },
    /// `ctl_cons` was published: every control entry before `cons` is
    /// acknowledged.
    CtlAck { cons: u32 },
    /// A channel took a command off its avail ring (raw `Opcode`, 0 when
    /// the command has none).
    CmdStart { channel: u8, opcode: u8 },
    /// A channel completed a command (raw `Status`).
    CmdComplete { channel: u8, opcode: u8, status: u8 },
    /// A driver event (raw `TraceKind`); its record's time is the guest TSC.
    Driver {
        kind: u32,
        context: u32,
        a: u64,
        b: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    /// Device ns, or for `Event::Driver` the guest TSC.
    t: u64,
    ev: Event,
}
// The memory bound the module's doc states.
const _: () = assert!(std::mem::size_of::<Rec>() == 40);

/// The host TSC and device clock read at one instant.
#[derive(Debug, Clone, Copy)]
struct ClockPoint {
    tsc: u64,
    ns: u64,
}

/// The host's time-stamp counter; 0 where there is none.
pub fn host_tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter: no memory access, no precondition,
        // present on every x86-64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// The recorded events and the clock pairing.
pub struct Trace {
    buf: Vec<Rec>,
    capacity: usize,
    /// Where the next event goes once `buf` is full (the oldest one).
    next: usize,
    dropped: u64,
    start: ClockPoint,
    /// The device's sample at the last TRACE_SYNC write.
    sync_sample: Option<ClockPoint>,
    /// (host sample, guest TSC) of the last completed pairing.
    sync: Option<(ClockPoint, u64)>,
    /// The driver's own count of events it could not write (ring full).
    pub(crate) guest_dropped: u32,
    /// Driver ring indices that ran ahead of the ring (entries skipped).
    pub(crate) guest_skipped: u64,
}

impl Trace {
    /// An empty trace keeping at most `capacity` (≥ 1) events; `now_ns` is
    /// the device clock.
    pub fn new(capacity: usize, now_ns: u64) -> Self {
        Self {
            buf: Vec::new(),
            capacity: capacity.max(1),
            next: 0,
            dropped: 0,
            start: ClockPoint {
                tsc: host_tsc(),
                ns: now_ns,
            },
            sync_sample: None,
            sync: None,
            guest_dropped: 0,
            guest_skipped: 0,
        }
    }

    /// Record `ev` at `t` (device ns; guest TSC for `Event::Driver`).
    pub fn push(&mut self, t: u64, ev: Event) {
        let rec = Rec { t, ev };
        if self.buf.len() < self.capacity {
            self.buf.push(rec);
        } else {
            self.buf[self.next] = rec;
            self.next = (self.next + 1) % self.capacity;
            self.dropped += 1;
        }
    }

    /// Events overwritten because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The events held, oldest first, with their raw time.
    pub fn events(&self) -> impl Iterator<Item = (u64, Event)> + '_ {
        let (new, old) = self.buf.split_at(self.next);
        old.iter().chain(new).map(|r| (r.t, r.ev))
    }

    /// TRACE_SYNC: sample the host clocks now.
    pub(crate) fn sync_sample(&mut self, now_ns: u64) {
        self.sync_sample = Some(ClockPoint {
            tsc: host_tsc(),
            ns: now_ns,
        });
    }

    /// TRACE_TSC_HI: the guest's TSC at the last sample.
    pub(crate) fn sync_guest(&mut self, guest_tsc: u64) {
        if let Some(s) = self.sync_sample.take() {
            self.sync = Some((s, guest_tsc));
        }
    }

    /// `host TSC - guest TSC` from the pairing, if the driver made one.
    pub fn tsc_offset(&self) -> Option<i64> {
        self.sync.map(|(s, g)| s.tsc.wrapping_sub(g) as i64)
    }

    /// Host TSC ticks per device ns, measured from the trace's start to
    /// `now_ns` (None without a TSC or before any time passed).
    fn tsc_per_ns(&self, now_ns: u64) -> Option<f64> {
        let dt = now_ns.checked_sub(self.start.ns).filter(|d| *d > 0)?;
        let dtsc = host_tsc().checked_sub(self.start.tsc).filter(|d| *d > 0)?;
        Some(dtsc as f64 / dt as f64)
    }

    /// The device ns of guest TSC `tsc`.
    fn guest_ns(&self, tsc: u64, rate: f64) -> f64 {
        let (anchor, guest) = match self.sync {
            Some((s, g)) => (s, g),
            None => (self.start, self.start.tsc),
        };
        // Through the anchor: host tsc of the event = tsc + (anchor.tsc - guest).
        let ticks = tsc.wrapping_sub(guest) as i64 as f64;
        anchor.ns as f64 + ticks / rate
    }

    /// The Chrome trace-event JSON (`{"traceEvents": [...], ...}`); `now_ns`
    /// is the device clock now (for the TSC rate).
    pub fn write_json(&self, now_ns: u64, w: &mut dyn Write) -> io::Result<()> {
        let rate = self.tsc_per_ns(now_ns);
        let mut out = Json::new(w);
        out.raw("{\"traceEvents\":[\n")?;
        out.meta(DEVICE_PID, None, "process_name", "Faultline GPU (device)")?;
        out.meta(DRIVER_PID, None, "process_name", "guest driver")?;
        out.meta(DEVICE_PID, Some(TID_FAULTS), "thread_name", "fault unit")?;
        out.meta(DEVICE_PID, Some(TID_CONTROL), "thread_name", "control ring")?;
        out.meta(DEVICE_PID, Some(TID_MSI), "thread_name", "interrupts (MSI)")?;
        for ch in 0..faultline_abi::NUM_CHANNELS {
            let name = format!("channel {ch}");
            out.meta(DEVICE_PID, Some(TID_CHANNEL0 + ch), "thread_name", &name)?;
        }
        out.meta(DRIVER_PID, Some(1), "thread_name", "fault service")?;
        let mut st = Export::default();
        for (t, ev) in self.events() {
            match ev {
                Event::Driver { .. } => {
                    if let Some(rate) = rate {
                        st.driver(&mut out, self.guest_ns(t, rate), ev)?;
                    }
                }
                _ => st.device(&mut out, t, ev)?,
            }
        }
        let clock = match (self.tsc_offset(), rate) {
            (_, None) => "no host TSC: driver events left out".to_string(),
            (Some(off), Some(r)) => format!(
                "driver events placed by the TRACE_SYNC pairing: host TSC - guest TSC = {off}, \
                 host TSC {:.3} GHz",
                r
            ),
            (None, Some(r)) => format!(
                "no TRACE_SYNC pairing: driver events placed as if guest TSC = host TSC \
                 ({:.3} GHz)",
                r
            ),
        };
        out.raw(&format!(
            "\n],\"displayTimeUnit\":\"ns\",\"otherData\":{{\"dropped\":{},\"guest_dropped\":{},\
             \"guest_skipped\":{},\"clock\":{}}}}}\n",
            self.dropped,
            self.guest_dropped,
            self.guest_skipped,
            quote(&clock)
        ))
    }
}

const DEVICE_PID: u32 = 1;
const DRIVER_PID: u32 = 2;
const TID_FAULTS: u32 = 1;
const TID_CONTROL: u32 = 2;
const TID_MSI: u32 = 3;
const TID_CHANNEL0: u32 = 10;

/// Pairing state of the export: open spans become "b"/"e" or "X" events.
#[derive(Default)]
struct Export {
    /// Faults raised and not replayed yet: (async id, span name).
    open_faults: Vec<(u64, String)>,
    next_fault_id: u64,
    /// Control entries taken and not acknowledged: (seq, span name).
    open_ctl: Vec<(u32, String)>,
    /// Per channel: (start ns, opcode) of the command in flight.
    cmd: [Option<(u64, u8)>; faultline_abi::NUM_CHANNELS as usize],
    /// The last driver event that opens a servicing span (batch, window).
    driver_prev: Option<f64>,
}

fn vector_name(v: u32) -> &'static str {
    match v {
        faultline_abi::vector::FAULT => "MSI FAULT",
        faultline_abi::vector::CHANNEL => "MSI CHANNEL",
        faultline_abi::vector::ERROR => "MSI ERROR",
        faultline_abi::vector::CONTROL => "MSI CONTROL",
        _ => "MSI",
    }
}

fn access_name(a: u8) -> String {
    Access::from_u8(a).map_or_else(
        || format!("access {a}"),
        |a| format!("{a:?}").to_lowercase(),
    )
}

fn opcode_name(op: u8) -> String {
    Opcode::from_u32(u32::from(op)).map_or_else(|| format!("opcode {op}"), |o| format!("{o:?}"))
}

impl Export {
    fn device(&mut self, out: &mut Json, ns: u64, ev: Event) -> io::Result<()> {
        let ts = ns as f64;
        match ev {
            Event::FaultRaised {
                context,
                va,
                access,
                channel,
            } => {
                let args = format!(
                    "{{\"va\":\"{va:#x}\",\"access\":\"{}\",\"context\":{context},\"channel\":{channel}}}",
                    access_name(access)
                );
                out.instant(DEVICE_PID, TID_FAULTS, ts, "fault raised", &args)?;
                let id = self.next_fault_id;
                self.next_fault_id += 1;
                if self.open_faults.len() < OPEN_LIMIT {
                    let name = format!("fault {va:#x}");
                    out.async_ev('b', "fault", id, ts, &name, &args)?;
                    self.open_faults.push((id, name));
                }
            }
            Event::Msi { vector } => {
                out.instant(DEVICE_PID, TID_MSI, ts, vector_name(vector), "{}")?;
            }
            Event::Replay { seq } => {
                let args = format!("{{\"replay_seq\":{seq}}}");
                out.instant(DEVICE_PID, TID_FAULTS, ts, "replay received", &args)?;
                for (id, name) in std::mem::take(&mut self.open_faults) {
                    out.async_ev('e', "fault", id, ts, &name, "{}")?;
                }
            }
            Event::CtlStart {
                seq,
                op,
                context,
                start,
                len,
            } => {
                let name = CtlOp::from_u32(op)
                    .map_or_else(|| format!("control op {op}"), |o| format!("{o:?}"));
                let args = format!(
                    "{{\"seq\":{seq},\"context\":{context},\"start\":\"{start:#x}\",\"len\":{len}}}"
                );
                if self.open_ctl.len() < OPEN_LIMIT {
                    out.async_ev('b', "control", u64::from(seq), ts, &name, &args)?;
                    self.open_ctl.push((seq, name));
                }
            }
            Event::CtlAck { cons } => {
                let (acked, open): (Vec<_>, Vec<_>) = std::mem::take(&mut self.open_ctl)
                    .into_iter()
                    .partition(|(s, _)| (cons.wrapping_sub(*s) as i32) > 0);
                self.open_ctl = open;
                for (seq, name) in acked {
                    out.async_ev('e', "control", u64::from(seq), ts, &name, "{}")?;
                }
                let args = format!("{{\"ctl_cons\":{cons}}}");
                out.instant(DEVICE_PID, TID_CONTROL, ts, "ack (ctl_cons)", &args)?;
            }
            Event::CmdStart { channel, opcode } => {
                if let Some(slot) = self.cmd.get_mut(usize::from(channel)) {
                    *slot = Some((ns, opcode));
                }
            }
            Event::CmdComplete {
                channel,
                opcode,
                status,
            } => {
                let tid = TID_CHANNEL0 + u32::from(channel);
                let status = Status::from_u32(u32::from(status))
                    .map_or_else(|| format!("{status}"), |s| format!("{s:?}"));
                let args = format!("{{\"status\":\"{status}\"}}");
                let start = self
                    .cmd
                    .get_mut(usize::from(channel))
                    .and_then(Option::take)
                    .filter(|(_, op)| *op == opcode);
                let name = opcode_name(opcode);
                match start {
                    Some((t0, _)) => {
                        out.complete(DEVICE_PID, tid, t0 as f64, ts - t0 as f64, &name, &args)?
                    }
                    // Its start was overwritten, or it failed to decode.
                    None => out.instant(DEVICE_PID, tid, ts, &name, &args)?,
                }
            }
            Event::Driver { .. } => {}
        }
        Ok(())
    }

    fn driver(&mut self, out: &mut Json, ts: f64, ev: Event) -> io::Result<()> {
        let Event::Driver {
            kind,
            context,
            a,
            b,
        } = ev
        else {
            return Ok(());
        };
        let Some(kind) = TraceKind::from_u32(kind) else {
            let args = format!("{{\"kind\":{kind},\"a\":{a},\"b\":{b}}}");
            return out.instant(DRIVER_PID, 1, ts, "unknown driver event", &args);
        };
        match kind {
            TraceKind::BatchDrained => {
                let args = format!("{{\"entries\":{a},\"faults\":{b}}}");
                self.driver_prev = Some(ts);
                out.instant(DRIVER_PID, 1, ts, "batch drained", &args)
            }
            TraceKind::WindowServiced => {
                let args = format!(
                    "{{\"va\":\"{a:#x}\",\"size\":{b},\"size_kib\":{},\"context\":{context}}}",
                    b / 1024
                );
                // Windows are serviced one after another after the drain:
                // each spans from the previous event of the pass.
                let t0 = self.driver_prev.filter(|t| *t <= ts).unwrap_or(ts);
                self.driver_prev = Some(ts);
                out.complete(DRIVER_PID, 1, t0, ts - t0, "window serviced", &args)
            }
            TraceKind::Retry => {
                let args = format!("{{\"va\":\"{a:#x}\",\"size\":{b},\"context\":{context}}}");
                out.instant(DRIVER_PID, 1, ts, "retry", &args)
            }
            TraceKind::Cancel => {
                let args = format!("{{\"va\":\"{a:#x}\",\"context\":{context}}}");
                out.instant(DRIVER_PID, 1, ts, "cancel", &args)
            }
            TraceKind::Invalidate => {
                let args = format!("{{\"start\":\"{a:#x}\",\"len\":{b},\"context\":{context}}}");
                out.instant(DRIVER_PID, 1, ts, "invalidate callback", &args)
            }
            TraceKind::Replay => {
                self.driver_prev = None;
                out.instant(DRIVER_PID, 1, ts, "replay rung", "{}")
            }
        }
    }
}

/// At most this many spans are kept open by the export (faults waiting
/// for a replay, control entries waiting for their ack).
const OPEN_LIMIT: usize = 1 << 16;

/// A JSON string literal.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The trace-event writer: one event per line, commas between.
struct Json<'a> {
    w: &'a mut dyn Write,
    first: bool,
}

/// Device ns as trace-event µs.
fn us(ns: f64) -> String {
    format!("{:.3}", ns / 1000.0)
}

impl<'a> Json<'a> {
    fn new(w: &'a mut dyn Write) -> Self {
        Self { w, first: true }
    }

    fn raw(&mut self, s: &str) -> io::Result<()> {
        self.w.write_all(s.as_bytes())
    }

    fn event(&mut self, body: &str) -> io::Result<()> {
        if !self.first {
            self.w.write_all(b",\n")?;
        }
        self.first = false;
        self.w.write_all(body.as_bytes())
    }

    fn meta(&mut self, pid: u32, tid: Option<u32>, what: &str, name: &str) -> io::Result<()> {
        let tid = tid.map_or(String::new(), |t| format!(",\"tid\":{t}"));
        self.event(&format!(
            "{{\"ph\":\"M\",\"pid\":{pid}{tid},\"name\":\"{what}\",\"args\":{{\"name\":{}}}}}",
            quote(name)
        ))
    }

    fn instant(&mut self, pid: u32, tid: u32, ns: f64, name: &str, args: &str) -> io::Result<()> {
        self.event(&format!(
            "{{\"ph\":\"i\",\"s\":\"t\",\"pid\":{pid},\"tid\":{tid},\"ts\":{},\"name\":{},\"args\":{args}}}",
            us(ns),
            quote(name)
        ))
    }

    fn complete(
        &mut self,
        pid: u32,
        tid: u32,
        ns: f64,
        dur_ns: f64,
        name: &str,
        args: &str,
    ) -> io::Result<()> {
        self.event(&format!(
            "{{\"ph\":\"X\",\"pid\":{pid},\"tid\":{tid},\"ts\":{},\"dur\":{},\"name\":{},\"args\":{args}}}",
            us(ns),
            us(dur_ns.max(0.0)),
            quote(name)
        ))
    }

    fn async_ev(
        &mut self,
        ph: char,
        cat: &str,
        id: u64,
        ns: f64,
        name: &str,
        args: &str,
    ) -> io::Result<()> {
        self.event(&format!(
            "{{\"ph\":\"{ph}\",\"cat\":\"{cat}\",\"id\":\"{cat}{id}\",\"pid\":{DEVICE_PID},\"tid\":{},\
             \"ts\":{},\"name\":{},\"args\":{args}}}",
            if cat == "fault" { TID_FAULTS } else { TID_CONTROL },
            us(ns),
            quote(name)
        ))
    }
}
