use faultline_abi::{Pte, Status, LEAF_4K};
use faultline_device::testing::{cmd, Rig, DATA};

#[test]
fn fill_then_copy() {
    let mut rig = Rig::new(64 << 20, 64);
    assert!(rig.enable_channel(0, 0));
    rig.map_range(0, 0x10_0000, DATA, 0x4000, LEAF_4K, Pte::WRITE);
    let t = rig.exec(0, cmd::fill(0x10_0000, 0x2000, 0x0807060504030201));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(
        rig.read_bytes(DATA + 0x1FF8, 8),
        vec![1, 2, 3, 4, 5, 6, 7, 8]
    );
    let t = rig.exec(0, cmd::copy(0x10_2000, 0x10_0000, 0x2000));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(
        rig.read_bytes(DATA + 0x2000, 0x2000),
        rig.read_bytes(DATA, 0x2000)
    );
}
