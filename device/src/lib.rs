//! The emulated Faultline GPU. Knows nothing of KVM: hosts drive it through
//! its register, doorbell and interrupt traits.
