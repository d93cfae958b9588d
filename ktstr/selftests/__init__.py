"""The kernel's own sched_ext selftests (``tools/testing/selftests/sched_ext``) in a ktstr VM.

``build`` builds the runner for a cached kernel entry and stores it there;
``parse`` reads the runner's output (pure); ``guest`` runs each test as its
own runner process inside the guest; ``run`` boots the VM and turns the
guest's reports into results; ``cli`` is ``ktstr selftests``. See
docs/selftests.md.

Nothing is imported here: the guest imports ``guest`` and ``parse`` only.
"""
