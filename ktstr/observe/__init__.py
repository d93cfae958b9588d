"""Host-side views of a running guest kernel: drgn over guest RAM, monitor samples,
failure dumps.

``kimage`` (where the kernel image sits, the VMCOREINFO drgn needs), ``program`` (a drgn
Program over guest RAM), ``state`` (run queues, sched_ext, tasks, DSQs as dataclasses),
``fastpath`` (the same run-queue fields by raw reads), ``monitor`` (the VMM's
``RunObserver``: sampling thread, exit capture, :class:`~ktstr.observe.monitor.Observation`),
``dump`` (the failure dump) and ``vmcore`` (guest RAM as an ELF core).
"""
