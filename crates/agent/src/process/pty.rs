//! The master side of a pseudo-terminal, read and written asynchronously.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An async PTY master.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    /// Wraps a non-blocking master fd.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays
        // open and unchanged for the registration's whole lifetime.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(io::Error::from)?;
        Ok(PtyMaster { fd })
    }

    /// The raw descriptor (for ioctls).
    pub fn fd(&self) -> &OwnedFd {
        self.fd.get_ref()
    }

    /// Reads some bytes; EIO (slave closed everywhere) is reported as an error.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| read_fd(fd.get_ref(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is available now (`WouldBlock` if nothing).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.get_ref(), buf)
    }

    /// Writes everything.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)
}
