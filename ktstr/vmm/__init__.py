"""The in-tree KVM virtual machine monitor (ctypes + ioctl_opt, no QEMU)."""
