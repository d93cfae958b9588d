"""Code that runs inside the guest VM: PID 1, the result channel client, the scenario context.

Everything under this package must use only the Python standard library: it is
packed into the guest's initramfs next to a bare interpreter.
"""
