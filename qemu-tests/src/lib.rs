//! Host-side support: QEMU machines, QMP, the test guest, captures.
