"""The host-guest contract: what crosses the VM boundary, defined once for both sides.

``request`` is what the host asks the guest init to do, ``frame`` how messages travel
on the result channel, ``messages`` what each message must look like, ``ports`` the
I/O ports the guest writes its boot mark and exit status to.

Packed into the guest next to a bare interpreter, so standard library only; nothing
here imports the VMM, the guest runtime or the orchestration around them.
"""
