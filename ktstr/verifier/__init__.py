"""`ktstr verifier`: per kernel x scheduler x topology, does every BPF program verify,
does the scheduler attach, does a workload get dispatched (three separate answers), with
each program's verified-instruction count read from guest memory."""
