"""Emulated devices. Each one is a :class:`~ktstr.vmm.bus.VmDevice`: it attaches its
port/MMIO ranges through an :class:`~ktstr.vmm.bus.AttachContext` and is closed with the VM."""
