//! GPU MSI vectors → KVM GSIs → irqfds, so the device thread raises an
//! interrupt with one eventfd write and no exit of ours.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, including the default
//! routes KVM installs for the PIC and IOAPIC pins; like Firecracker and
//! Cloud Hypervisor we therefore always send the legacy routes explicitly
//! (`legacy_routes`) followed by one MSI route per live vector.
//!
//! Ordering on every MSI capability change (`MsiRouter::apply`): irqfds whose
//! vector is masked, disabled or re-targeted are unregistered first, then
//! the table is replaced, then irqfds for newly live vectors are registered.
//! A vector never has an irqfd without a route. Pending bits of masked
//! vectors are the device's business (it holds the interrupt back and
//! re-raises it on unmask).

use std::sync::{Arc, Mutex};

use faultline_abi::pci::MSI_VECTORS;
use faultline_device::sync::lock;
use faultline_device::{InterruptSink, MsiState};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs 0..24 are the IOAPIC pins; the GPU's vectors follow.
pub const MSI_GSI_BASE: u32 = 24;
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;
/// x86 MSI messages target the LAPIC window 0xFEEx_xxxx; anything else
/// would be a DMA write to memory, which KVM's MSI routing cannot express.
const MSI_WINDOW: std::ops::RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

/// One routing table entry, in a form tests can compare without touching
/// the kernel structure's union.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    Msi { gsi: u32, address: u64, data: u32 },
}

impl Route {
    fn to_kvm(self) -> kvm_irq_routing_entry {
        match self {
            Route::Irqchip { gsi, chip, pin } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
                },
                ..Default::default()
            },
            Route::Msi { gsi, address, data } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: address as u32,
                        address_hi: (address >> 32) as u32,
                        data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            },
        }
    }
}

/// KVM's default x86 table (`default_routing` in arch/x86/kvm/): GSIs
/// 0..16 on both the IOAPIC pin and the PIC (master for 0..8, slave for
/// 8..16, pin = gsi % 8), GSIs 16..24 on the IOAPIC only.
pub fn legacy_routes() -> Vec<Route> {
    let mut r = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        r.push(Route::Irqchip {
            gsi,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: gsi,
        });
        if gsi < PIC_PINS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            r.push(Route::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
    }
    r
}

/// The message each vector should be routed with, or None if it must not
/// reach the guest now (MSI off, beyond the enabled count, masked, or an
/// address outside the MSI window).
pub fn live_messages(msi: &MsiState) -> Vec<Option<(u64, u32)>> {
    (0..MSI_VECTORS)
        .map(|v| {
            let enabled_here = v < msi.vectors && msi.mask & (1 << v) == 0;
            msi.message(v)
                .filter(|(addr, _)| enabled_here && MSI_WINDOW.contains(addr))
        })
        .collect()
}

/// The whole table to hand to KVM: legacy routes plus one MSI route per
/// live vector, vector `v` on GSI `MSI_GSI_BASE + v`.
pub fn routing_table(live: &[Option<(u64, u32)>]) -> Vec<Route> {
    let mut t = legacy_routes();
    for (v, m) in live.iter().enumerate() {
        if let Some((address, data)) = *m {
            t.push(Route::Msi {
                gsi: MSI_GSI_BASE + v as u32,
                address,
                data,
            });
        }
    }
    t
}

/// The KVM calls the router makes, behind a trait so the ordering rules are
/// testable without KVM.
pub trait IrqRouting: Send {
    fn set_routes(&mut self, routes: &[Route]) -> Result<(), kvm_ioctls::Error>;
    fn register_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    fn unregister_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
}

pub struct KvmIrqRoutingOps(pub Arc<VmFd>);

impl IrqRouting for KvmIrqRoutingOps {
    fn set_routes(&mut self, routes: &[Route]) -> Result<(), kvm_ioctls::Error> {
        let entries: Vec<_> = routes.iter().map(|r| r.to_kvm()).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.0.set_gsi_routing(&table)
    }
    fn register_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.0.register_irqfd(fd, gsi)
    }
    fn unregister_irqfd(&mut self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        self.0.unregister_irqfd(fd, gsi)
    }
}

struct RouterState {
    ops: Box<dyn IrqRouting>,
    /// Message each vector's irqfd is registered (and routed) with.
    active: Vec<Option<(u64, u32)>>,
    table: Option<Vec<Route>>,
}

/// The GPU's `InterruptSink`: `trigger` writes the vector's irqfd,
/// `msi_changed` reprograms routes and irqfds.
pub struct MsiRouter {
    irqfds: Vec<EventFd>,
    state: Mutex<RouterState>,
}

impl MsiRouter {
    /// Installs the legacy-only table at once, so a KVM that cannot route
    /// is reported at startup rather than at the guest's first MSI.
    pub fn new(ops: Box<dyn IrqRouting>) -> Result<Self, RouterError> {
        let irqfds = (0..MSI_VECTORS)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()
            .map_err(RouterError::EventFd)?;
        let router = Self {
            irqfds,
            state: Mutex::new(RouterState {
                ops,
                active: vec![None; MSI_VECTORS as usize],
                table: None,
            }),
        };
        router.apply(&MsiState::default())?;
        Ok(router)
    }

    pub fn apply(&self, msi: &MsiState) -> Result<(), RouterError> {
        let want = live_messages(msi);
        let mut st = lock(&self.state);
        let st = &mut *st;
        let mut first_err = None;
        for (v, fd) in self.irqfds.iter().enumerate() {
            let Some(cur) = st.active[v] else { continue };
            if want[v] == Some(cur) {
                continue;
            }
            let gsi = MSI_GSI_BASE + v as u32;
            if let Err(e) = st.ops.unregister_irqfd(fd, gsi) {
                first_err.get_or_insert(RouterError::Irqfd(gsi, e));
            }
            st.active[v] = None;
            if want[v].is_none() {
                // A trigger that raced the mask must not fire on a later
                // unmask (KVM injects a pending count at registration).
                let _ = fd.read();
            }
        }
        let table = routing_table(&want);
        if st.table.as_ref() != Some(&table) {
            if let Err(e) = st.ops.set_routes(&table) {
                // Leave every vector unregistered: no irqfd without a route.
                return Err(RouterError::Routes(e));
            }
            st.table = Some(table);
        }
        for (v, fd) in self.irqfds.iter().enumerate() {
            if want[v].is_none() || st.active[v].is_some() {
                continue;
            }
            let gsi = MSI_GSI_BASE + v as u32;
            match st.ops.register_irqfd(fd, gsi) {
                Ok(()) => st.active[v] = want[v],
                Err(e) => {
                    first_err.get_or_insert(RouterError::Irqfd(gsi, e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("creating an MSI irqfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM_SET_GSI_ROUTING: {0}")]
    Routes(kvm_ioctls::Error),
    #[error("KVM_IRQFD for GSI {0}: {1}")]
    Irqfd(u32, kvm_ioctls::Error),
}

impl InterruptSink for MsiRouter {
    fn trigger(&self, vector: u32) {
        // The device only triggers live vectors; an out-of-range one is a
        // device bug, not something to crash the VMM over.
        if let Some(fd) = self.irqfds.get(vector as usize) {
            if let Err(e) = fd.write(1) {
                log::warn!("GPU vector {vector}: irqfd write: {e}");
            }
        }
    }

    fn msi_changed(&self, msi: &MsiState) {
        if let Err(e) = self.apply(msi) {
            log::warn!("GPU MSI reprogramming: {e}");
        }
    }
}

/// The slow path `faultline run --gpu-no-fastpath` measures against: every
/// MSI is a `KVM_SIGNAL_MSI` ioctl from the device thread, with the message
/// looked up at that moment, instead of an irqfd write.
pub struct SignalMsi {
    vm: Arc<VmFd>,
    state: Mutex<MsiState>,
}

impl SignalMsi {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(MsiState::default()),
        }
    }
}

impl InterruptSink for SignalMsi {
    fn trigger(&self, vector: u32) {
        let live = live_messages(&lock(&self.state));
        let Some(Some((address, data))) = live.get(vector as usize).copied() else {
            return;
        };
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            log::warn!("GPU vector {vector}: KVM_SIGNAL_MSI: {e}");
        }
    }

    fn msi_changed(&self, msi: &MsiState) {
        *lock(&self.state) = *msi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Op {
        Routes(Vec<Route>),
        Reg(u32),
        Unreg(u32),
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Vec<Op>>>);

    impl IrqRouting for Fake {
        fn set_routes(&mut self, routes: &[Route]) -> Result<(), kvm_ioctls::Error> {
            self.0.lock().unwrap().push(Op::Routes(routes.to_vec()));
            Ok(())
        }
        fn register_irqfd(&mut self, _: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            self.0.lock().unwrap().push(Op::Reg(gsi));
            Ok(())
        }
        fn unregister_irqfd(&mut self, _: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            self.0.lock().unwrap().push(Op::Unreg(gsi));
            Ok(())
        }
    }

    fn msi(enabled: bool, vectors: u32, mask: u32) -> MsiState {
        MsiState {
            enabled,
            address: 0xfee0_1000,
            data: 0x40,
            vectors,
            mask,
            pending: 0,
        }
    }

    #[test]
    fn legacy_routes_match_kvm_defaults() {
        let r = legacy_routes();
        assert_eq!(r.len(), 24 + 16);
        for gsi in 0..24 {
            assert!(r.contains(&Route::Irqchip {
                gsi,
                chip: KVM_IRQCHIP_IOAPIC,
                pin: gsi
            }));
        }
        assert!(r.contains(&Route::Irqchip {
            gsi: 4,
            chip: KVM_IRQCHIP_PIC_MASTER,
            pin: 4
        }));
        assert!(r.contains(&Route::Irqchip {
            gsi: 12,
            chip: KVM_IRQCHIP_PIC_SLAVE,
            pin: 4
        }));
        assert!(!r.iter().any(|e| matches!(e,
            Route::Irqchip { gsi, chip, .. } if *gsi >= 16 && *chip != KVM_IRQCHIP_IOAPIC)));
    }

    #[test]
    fn table_keeps_legacy_routes_and_adds_live_vectors() {
        // 4 vectors enabled, vector 2 masked: data carries the vector in
        // its low bits (multi-message MSI).
        let t = routing_table(&live_messages(&msi(true, 4, 1 << 2)));
        let legacy = legacy_routes();
        assert_eq!(&t[..legacy.len()], &legacy[..]);
        assert_eq!(
            &t[legacy.len()..],
            &[
                Route::Msi {
                    gsi: 24,
                    address: 0xfee0_1000,
                    data: 0x40
                },
                Route::Msi {
                    gsi: 25,
                    address: 0xfee0_1000,
                    data: 0x41
                },
                Route::Msi {
                    gsi: 27,
                    address: 0xfee0_1000,
                    data: 0x43
                },
            ]
        );
        // Disabled, or pointing outside the LAPIC window: legacy only.
        assert_eq!(routing_table(&live_messages(&msi(false, 4, 0))), legacy);
        let mut bad = msi(true, 1, 0);
        bad.address = 0x1000;
        assert_eq!(routing_table(&live_messages(&bad)), legacy);
        // One vector enabled: only GSI 24.
        let t = routing_table(&live_messages(&msi(true, 1, 0)));
        assert_eq!(t.len(), legacy.len() + 1);
    }

    #[test]
    fn route_before_irqfd_and_unregister_before_reroute() {
        let fake = Fake::default();
        let router = MsiRouter::new(Box::new(fake.clone())).unwrap();
        let ops = || std::mem::take(&mut *fake.0.lock().unwrap());
        assert_eq!(ops(), vec![Op::Routes(legacy_routes())]);

        router.apply(&msi(true, 2, 0)).unwrap();
        let o = ops();
        assert!(matches!(o[0], Op::Routes(ref t) if t.len() == 42));
        assert_eq!(&o[1..], &[Op::Reg(24), Op::Reg(25)]);

        // Same state again: nothing to do.
        router.apply(&msi(true, 2, 0)).unwrap();
        assert_eq!(ops(), vec![]);

        // Mask vector 1: its irqfd goes before the table shrinks.
        router.apply(&msi(true, 2, 0b10)).unwrap();
        let o = ops();
        assert_eq!(o[0], Op::Unreg(25));
        assert!(matches!(o[1], Op::Routes(ref t) if t.len() == 41));
        assert_eq!(o.len(), 2);

        // New data (guest moved the interrupt): unregister, reroute,
        // register again.
        let mut m = msi(true, 2, 0b10);
        m.data = 0x50;
        router.apply(&m).unwrap();
        let o = ops();
        assert_eq!(o[0], Op::Unreg(24));
        assert!(matches!(o[1], Op::Routes(_)));
        assert_eq!(o[2], Op::Reg(24));

        // Disable: everything unregistered, legacy table.
        router.apply(&msi(false, 2, 0)).unwrap();
        assert_eq!(ops(), vec![Op::Unreg(24), Op::Routes(legacy_routes())]);
    }

    #[test]
    fn trigger_out_of_range_is_ignored() {
        let router = MsiRouter::new(Box::new(Fake::default())).unwrap();
        router.trigger(1000);
        router.trigger(0);
        assert_eq!(router.irqfds[0].read().unwrap(), 1);
    }
}
