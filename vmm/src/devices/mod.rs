//! Legacy platform devices on the PIO bus.

pub mod debug_exit;
pub mod debugcon;
pub mod linecon;
pub mod serial;

/// A console for device tests: keeps what is written.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct Sink(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
