//! Unit tests of the GPU handle that need no device.

use super::*;

#[test]
fn handles_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Gpu>();
    send_sync::<GpuBuf>();
}
