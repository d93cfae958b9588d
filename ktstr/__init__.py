"""ktstr: a test harness for Linux process schedulers.

Every test boots a real kernel in its own KVM virtual machine (run by the
in-tree VMM in :mod:`ktstr.vmm`) with a declared CPU topology, starts the
scheduler under test inside it, runs a scenario and checks scheduling
properties on the telemetry that comes back.
"""

__version__ = "0.1.0"
