//! Socket options socket2 does not offer (IP_BIND_ADDRESS_NO_PORT, SO_RCVBUFFORCE, the
//! raw ICMP sockets' type filters), set in one place so that the one `unsafe` call
//! checks its size once.

use std::{io, os::fd::AsRawFd};

/// setsockopt(`fd`, `level`, `name`, `value`), `value` passed by pointer with its size.
pub fn set<T: Copy>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: a valid fd, and a pointer to `size_of::<T>()` readable bytes; T: Copy keeps
    // out types whose bytes are not plain data.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
