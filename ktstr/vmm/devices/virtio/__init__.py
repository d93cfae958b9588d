"""virtio devices over the virtio-mmio transport: split virtqueues, virtio-blk."""
